"""``keys create``: the operator key pair admin commands are signed with
(local: no engine, no configuration)."""

import argparse
from pathlib import Path

from vtpcm_common import authn
from vtpcm_nova.cmd.manage.results import EXIT_OK, Result


def keys_create(args: argparse.Namespace) -> Result:
    """Make an operator key pair (or show an existing one: safe to repeat).
    Only the fingerprint and paths are printed, never key material."""
    path = Path(args.path)
    existed = path.exists()
    signer = authn.load_or_create_signing_key(path)
    return EXIT_OK, {"private_key": str(path),
                     "public_key": str(authn.public_key_path(path)),
                     "fingerprint": signer.fingerprint, "created": not existed}
