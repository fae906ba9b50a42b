"""The shared deployment builder (``deploy.build``) leaves nothing running
when the test inside it fails: engine workers, agents, the vTPCM swtpm an
agent started and the host-TPM stand-ins are all gone, and so are the work
dir and the exchange's keys. A builder that left them would let one failed
functional test slow or confuse every later one on the shared machine."""

from pathlib import Path

import pytest

from tests.functional.deploy import Spec, Trust, build, running_vtpcm
from vtpcm_lab import daemons

pytestmark = pytest.mark.functional


class Planted(Exception):
    """The failure of the test body."""


def _alive(pid: int) -> bool:
    try:
        stat = Path("/proc/%d/stat" % pid).read_text()
    except OSError:
        return False
    return ") Z " not in stat  # a zombie has exited


def test_a_failing_test_leaves_no_process_nor_file_behind():
    spec = Spec("dpl", labels=("a", "b"), workers=2, trust=Trust(labels=("a",)))
    with pytest.raises(Planted), build(spec) as d:  # the body is what fails
        instance, _ = running_vtpcm(d, "a")
        pids = [e.pid for e in d.engines] + [h.agent.pid for h in d.hosts.values()]
        pids += [h.tpm.pid for h in d.hosts.values()]
        pids.append(d.agents.get(d.names["a"], instance).pid)
        assert None not in pids and all(_alive(p) for p in pids), pids
        work, keys = d.work, daemons.signing_key_path(d.exchange).parent
        assert work.is_dir() and keys.is_dir()
        raise Planted
    assert [p for p in pids if _alive(p)] == []
    assert not work.exists() and not keys.exists()
