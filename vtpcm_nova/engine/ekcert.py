"""The engine's EK certificate checks: ``vtpcm_common.ekcert`` (moved there
so that the agent verifies its own TPM's EK with the same code before its
first start, ``[host_tpm] ek_ca_file``)."""

from vtpcm_common.ekcert import (
    TCG_KP_EK_CERTIFICATE as TCG_KP_EK_CERTIFICATE,
)
from vtpcm_common.ekcert import fingerprint as fingerprint
from vtpcm_common.ekcert import load_ca_file as load_ca_file
from vtpcm_common.ekcert import printable as printable
from vtpcm_common.ekcert import verify as verify
