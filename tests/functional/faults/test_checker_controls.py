"""Planted positive controls for the fault matrix's checker
(``assert_one_place``): each kind of leftover it looks for, planted once,
is found. Without these a matrix of "no orphan" passes would mean nothing."""

import shutil
import subprocess
import sys
import uuid

import pytest

from tests.functional.faults.deployment import (
    Deployment,
    assert_one_place,
    files_now,
    running_vtpcm,
)

pytestmark = pytest.mark.functional


def test_checker_finds_a_state_dir_a_key_file_and_a_process_left_behind(
        deployment: Deployment) -> None:
    d = deployment
    files = files_now(d)
    instance, vtpcm_id = running_vtpcm(d, "a")
    assert assert_one_place(d, instance, files) == ("a", vtpcm_id, True)
    b = d.hosts["b"]
    orphan_dir = b.state_root / "vtpcms" / str(uuid.uuid4())
    orphan_dir.mkdir(parents=True)
    with pytest.raises(AssertionError, match=orphan_dir.name):
        assert_one_place(d, instance, files)
    shutil.rmtree(orphan_dir)
    orphan_key = b.state_root / "keys" / (str(uuid.uuid4()) + ".keys")
    orphan_key.parent.mkdir(parents=True, exist_ok=True)
    orphan_key.write_bytes(b"x")
    with pytest.raises(AssertionError, match=orphan_key.name.removesuffix(".keys")):
        assert_one_place(d, instance, files)
    orphan_key.unlink()
    # a process naming the instance, as an orphan swtpm's argv does
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", instance])
    try:
        with pytest.raises(AssertionError, match=str(proc.pid)):
            assert_one_place(d, instance, files)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert assert_one_place(d, instance, files) == ("a", vtpcm_id, True)
    d.at["a"].destroy_vtpcm(instance)
