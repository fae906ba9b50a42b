"""lab_lm.py's arithmetic: the figures the benchmark README quotes (ratios,
paired differences, targets) come from here, so they are checked on
samples whose answer is known. Warm-up rounds must not count."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # lab_lm imports its sibling benchlib
    try:
        spec = importlib.util.spec_from_file_location("lab_lm_under_test", BENCH / "lab_lm.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


lab_lm = _load()


def _rec(rnd: int, total: float, down: float, warmup: bool = False) -> dict:
    return {"round": rnd, "warmup": warmup, "total_ms": total, "libvirt_ms": total,
            "downtime_ms": down, "downtime_net_ms": down, "time_elapsed_ms": total}


def _config(memory: int = 1024, dirty: int = 0) -> dict:
    none = [_rec(0, 9e9, 9e9, warmup=True)] + [_rec(r, 1000.0 + r, 50.0) for r in range(4)]
    emulator = [_rec(r, 1500.0, 80.0) for r in range(4)]
    # vtpcm: +10 ms total and +1 ms downtime over none in every round
    vtpcm = [_rec(r, 1010.0 + r, 51.0) for r in range(4)]
    for r in vtpcm:
        r.update(check_ms=1.0, begin_ms=2.0, commit_ms=3.0, protocol_ms=6.0)
    return {"memory_mib": memory, "dirty_mibps": dirty,
            "samples": {"none": none, "emulator": emulator, "vtpcm": vtpcm}}


def test_warmup_rounds_are_left_out_and_pairs_are_the_same_round() -> None:
    result = lab_lm.analyse(_config())
    assert result["arms"]["none"]["total_ms"]["n"] == 4
    assert result["arms"]["none"]["total_ms"]["max"] == 1003.0  # not the 9e9 warm-up
    cmp = result["comparison"]
    assert cmp["vtpcm_vs_none/total_ms"]["paired_added_ms"]["median"] == 10.0
    assert cmp["vtpcm_vs_none/total_ms"]["added_ms_of_medians"] == 10.0
    assert abs(cmp["vtpcm_vs_none/total_ms"]["ratio_of_medians"] - 1011.5 / 1001.5) < 1e-9
    assert cmp["vtpcm_vs_emulator/downtime_ms"]["added_ms_of_medians"] == -29.0
    assert result["vtpcm_protocol"]["protocol_ms"]["median"] == 6.0


def test_targets_are_judged_on_the_1_gib_run_without_dirtying() -> None:
    ok = dict(_config(), analysis=lab_lm.analyse(_config()))
    judged = lab_lm.targets([ok])
    assert [t["met"] for t in judged] == [True, True]  # 1.0100 and +1 ms
    slow = _config()
    for r in slow["samples"]["vtpcm"]:
        r["total_ms"] += 20.0
        r["downtime_ms"] += 5.0
    judged = lab_lm.targets([dict(slow, analysis=lab_lm.analyse(slow))])
    assert [t["met"] for t in judged] == [False, False]
    # other settings are not judged
    other = [dict(_config(256), analysis=lab_lm.analyse(_config(256))),
             dict(_config(1024, 32), analysis=lab_lm.analyse(_config(1024, 32)))]
    assert lab_lm.targets(other) == []
