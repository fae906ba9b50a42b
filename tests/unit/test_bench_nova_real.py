"""nova_real_phases / nova_real_lm: the spans the benchmark README quotes are
read from log lines, so they are checked on a made-up migration whose
answer is known: markers on the right host only, a line without the
instance matched by the conductor's request id, another instance's lines
ignored, a missing marker leaves its spans out; the paired difference."""

import datetime
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
INSTANCE = "2f5d9adb-af40-4795-b92e-34060e43a6b2"
OTHER = "9bab8b79-1027-40af-90cf-c42c1a633f53"
REQ = "req-e1426d9b-6b5f-4b29-84d1-6a4164e59ae5"
T0 = datetime.datetime(2026, 11, 30, 20, 3, 40)


def _load(name: str) -> ModuleType:
    sys.path.insert(0, str(BENCH))  # siblings import benchlib / nova_real_phases
    try:
        spec = importlib.util.spec_from_file_location(name + "_under_test",
                                                      BENCH / (name + ".py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


phases = _load("nova_real_phases")
nova_real_lm = _load("nova_real_lm")


def _line(at: float, text: str, req: str = REQ, instance: str | None = INSTANCE) -> str:
    when = (T0 + datetime.timedelta(seconds=at)).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    inst = "[instance: %s] " % instance if instance else ""
    return "%s 29326 DEBUG nova.compute.manager [None %s admin admin - - default default] " \
           "%s%s\n" % (when, req, inst, text)


def _write(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "cond.log").write_text(
        _line(1.0, "Requesting cell X(cell1) while live migrating", instance=INSTANCE))
    (tmp_path / "b.log").write_text("".join([
        _line(1.2, "destination check data is LibvirtLiveMigrateData()", instance=None),
        _line(1.25, "destination check data is (another request)", req="req-other",
              instance=None),
        _line(1.5, "pre_live_migration data is LibvirtLiveMigrateData()"),
        _line(4.0, "Post operation of migration started"),
    ]))
    (tmp_path / "a.log").write_text("".join([
        # the same marker for another instance, earlier: not ours
        _line(1.9, "live_migration data is X", req="req-other", instance=OTHER),
        _line(2.0, "Took 0.50 seconds for pre_live_migration on destination host lab-b."),
        _line(2.0, "live_migration data is LibvirtLiveMigrateData()"),
        _line(2.05, "vTPCM begin of migration m took 60 ms (instance %s)" % INSTANCE,
              instance=None),
        _line(2.1, "About to invoke the migrate API"),
        _line(3.6, "Migration operation has completed"),
        _line(3.6, "_post_live_migration() is started.."),
        _line(3.65, "Calling driver.cleanup from _post_live_migration"),
    ]))
    return {"compute:lab-a": "a.log", "compute:lab-b": "b.log", "nova-conductor": "cond.log"}


def test_the_spans_of_one_migration(tmp_path: Path) -> None:
    roles = _write(tmp_path)
    sample = {"instance": INSTANCE, "source": "lab-a", "dest": "lab-b",
              "wall_start": T0.timestamp(), "wall_end": T0.timestamp() + 5.0,
              "cli_to_active_ms": 4500.0}
    got = {k: round(v) for k, v in phases.phases(tmp_path, roles, sample).items()}
    assert got == {
        "prechecks_ms": 1500, "cli_api_ms": 1000, "schedule_dest_check_ms": 200,
        "src_check_to_pre_ms": 300, "pre_live_migration_ms": 500, "to_driver_ms": 0,
        "before_libvirt_ms": 100, "checked_to_libvirt_ms": 900, "libvirt_ms": 1500,
        "to_post_ms": 0,
        "post_driver_ms": 50, "to_dest_post_ms": 350, "tail_ms": 500, "total_ms": 4500,
        "driver_begin_ms": 60}


def test_a_missing_marker_leaves_its_spans_out(tmp_path: Path) -> None:
    roles = _write(tmp_path)
    (tmp_path / "cond.log").write_text("")  # no conductor line: no request id either
    sample = {"instance": INSTANCE, "source": "lab-a", "dest": "lab-b",
              "wall_start": T0.timestamp(), "wall_end": T0.timestamp() + 5.0,
              "cli_to_active_ms": 4500.0}
    got = phases.phases(tmp_path, roles, sample)
    assert "cli_api_ms" not in got and "schedule_dest_check_ms" not in got
    assert "src_check_to_pre_ms" not in got  # its start was a line without the instance
    assert got["prechecks_ms"] == pytest.approx(1500, abs=1)


def test_compare_pairs_the_same_hop() -> None:
    samples = [{"arm": arm, "hop": hop, "cli_to_active_ms": ms, "phases_ms": {"x_ms": ms / 2}}
               for hop, arm, ms in ((1, "vtpcm", 6000.0), (1, "plain", 5000.0),
                                    (2, "plain", 7000.0), (2, "vtpcm", 6500.0),
                                    (3, "vtpcm", 5000.0))]
    row = nova_real_lm.compare(samples)["cli_to_active_ms"]
    assert row["vtpcm"]["median"] == 6000.0 and row["plain"]["median"] == 6000.0
    assert row["added_ms"] == 0.0 and row["ratio_vtpcm_over_plain"] == 1.0
    assert row["paired_added_ms"]["n"] == 2  # hop 3 has no plain migration
    assert sorted([row["paired_added_ms"]["min"], row["paired_added_ms"]["max"]]) == \
        [-500.0, 1000.0]
    assert nova_real_lm.compare(samples)["x_ms"]["paired_added_ms"]["median"] == 125.0


@pytest.mark.parametrize("timeout,expected", [(0.0, 0.0), (30, 30.0), (None, 60.0)])
def test_early_begin_timeout_reaches_the_drivers_option(
        tmp_path: Path, timeout: float | None, expected: float) -> None:
    """--early-begin-timeout, as the lab writes it into a compute's file, is
    what the driver's [vtpcm] early_begin_timeout reads (unset: its default)."""
    from oslo_config import cfg

    from vtpcm_lab.nova import configs
    from vtpcm_nova.conf import compute as compute_conf

    sections = configs.overlay({"vtpcm": {"host_command_key": "/k"}},
                               nova_real_lm.compute_options(timeout))
    path = tmp_path / "nova-compute.conf"
    path.write_text(configs.render_ini(sections))
    conf = cfg.ConfigOpts()
    compute_conf.register_opts(conf)
    conf([], default_config_files=[str(path)])
    assert conf.vtpcm.early_begin_timeout == expected


nova_real_ab = _load("nova_real_ab")


def _run(pairs: list[tuple[float, float]], load: float = 1.0) -> dict[str, object]:
    """One run: per hop (vtpcm ms, plain ms), the hop order alternating."""
    samples = []
    for hop, (v, p) in enumerate(pairs, 1):
        for arm, ms in (("vtpcm", v), ("plain", p))[::1 if hop % 2 else -1]:
            samples.append({"arm": arm, "hop": hop, "cli_to_active_ms": ms,
                            "loadavg_1m": load,
                            "phases_ms": {"x_ms": ms / 10} if arm == "vtpcm" else {}})
    return {"samples": samples}


def test_ab_pools_the_paired_differences_of_each_arm_and_subtracts_them() -> None:
    runs = {"on": {1: _run([(6000, 5000), (6200, 5000)]), 2: _run([(5000, 4800)], 3.0)},
            "off": {1: _run([(5900, 5000), (5100, 4500)]), 2: _run([(4000, 3000)])}}
    out = nova_real_ab.pool(runs)
    pooled = out["pooled"]["cli_to_active_ms"]
    assert pooled["on"]["paired"]["n"] == 3 and pooled["on"]["paired"]["median"] == 1000
    assert pooled["off"]["paired"]["median"] == 900  # 900, 600, 1000
    assert pooled["on"]["plain"]["median"] == 5000 and pooled["off"]["vtpcm"]["n"] == 3
    row = out["a_minus_b"]["cli_to_active_ms"]
    assert row["paired_median_diff"] == 100
    assert row["by_run_pair"] == [(1100 - 750), (200 - 1000)]
    assert row["vtpcm_median_diff"] == 6000 - 5100 and row["plain_median_diff"] == 5000 - 4500
    low, high = row["bootstrap_95"]
    assert -800 <= low <= 100 <= high <= 600 and low < high  # 200-1000 .. 1200-600
    # a span only the vTPCM has: no paired figure, its medians compared
    assert out["a_minus_b"]["x_ms"] == {"vtpcm_median_diff": 600 - 510}
    assert out["runs"]["on-2"]["loadavg_1m"]["max"] == 3.0
    assert out["runs"]["off-1"]["metrics"]["cli_to_active_ms"]["paired"]["median"] == 750


def test_reparse_reads_the_spans_again_and_keeps_the_runs_load(tmp_path: Path) -> None:
    """--reparse rewrites an earlier run's JSON: new spans, but the machine's
    load at the end of that run, not at the rewrite."""
    import json
    roles = _write(tmp_path)
    sample = {"arm": "vtpcm", "hop": 1, "instance": INSTANCE, "source": "lab-a",
              "dest": "lab-b", "wall_start": T0.timestamp(),
              "wall_end": T0.timestamp() + 5.0, "cli_to_active_ms": 4500.0}
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"samples": [sample], "log_roles": roles,
                                "logs_dir": str(tmp_path),
                                "machine": {"loadavg_end": [9.5, 8.5, 7.5]}}))
    assert nova_real_lm.main(["--reparse", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["samples"][0]["phases_ms"]["before_libvirt_ms"] == pytest.approx(100, abs=1)
    assert result["machine"]["loadavg_end"] == [9.5, 8.5, 7.5]
