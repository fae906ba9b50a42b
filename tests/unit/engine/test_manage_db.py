"""``vtpcm-manage db sync`` and ``db version`` on a real SQLite file: the
schema moves only when asked, errors name what was wrong and never echo
the database URL (it may hold a password)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from oslo_config import cfg

from vtpcm_common import exception
from vtpcm_nova.cmd import manage
from vtpcm_nova.engine.db import api, migration

SECRET = "s3cret-pw"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = manage.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def engine_conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An engine configuration file whose [engine] connection is a new SQLite file."""
    monkeypatch.setattr(cfg, "find_config_files", lambda **kw: [])
    conf = tmp_path / "vtpcm-engine.conf"
    conf.write_text(f"[engine]\nconnection = sqlite:///{tmp_path}/engine.sqlite\n")
    return conf


def test_db_sync_then_version(engine_conf: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/engine.sqlite"
    code, out, _ = run(capsys, "--config-file", str(engine_conf), "db", "version",
                       "--format", "json")
    assert code == 0
    assert json.loads(out) == {"current": "empty (no engine schema)", "head": migration.head()}
    with pytest.raises(exception.SchemaNotAtHead):
        api.Database(url)

    code, out, _ = run(capsys, "--config-file", str(engine_conf), "--format", "json",
                       "db", "sync")
    assert code == 0
    assert json.loads(out) == {"before": "empty (no engine schema)",
                               "after": f"revision {migration.head()}",
                               "head": migration.head()}
    api.Database(url).dispose()  # the engine starts on it now

    code, out, _ = run(capsys, "--config-file", str(engine_conf), "db", "version")
    assert code == 0
    assert out.split("\n")[1].split() == ["current", "revision", migration.head()]


def test_db_sync_to_a_revision(engine_conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--config-file", str(engine_conf), "--format", "json",
                       "db", "sync", "--revision", migration.BASE_REVISION)
    assert code == 0 and json.loads(out)["after"] == f"revision {migration.BASE_REVISION}"


@pytest.mark.parametrize("url", [f"nosuchdb://admin:{SECRET}@db/engine",
                                 f"postgresql://admin:{SECRET}@db:notaport/engine",
                                 f"admin:{SECRET}@db"])
def test_db_sync_bad_url_is_a_usage_error_without_the_url(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], url: str) -> None:
    monkeypatch.setattr(cfg, "find_config_files", lambda **kw: [])
    conf = tmp_path / "bad.conf"
    conf.write_text(f"[engine]\nconnection = {url}\n")
    code, out, err = run(capsys, "--config-file", str(conf), "db", "sync")
    assert (code, out) == (2, "")
    assert err == ("vtpcm-manage: error: configuration: [engine] connection is not a "
                   "database URL this engine can use\n")


def test_db_sync_unreachable_database_without_the_password(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cfg, "find_config_files", lambda **kw: [])
    conf = tmp_path / "pg.conf"
    # port 9 (discard): nothing listens there
    conf.write_text(f"[engine]\nconnection = postgresql://vtpcm:{SECRET}@127.0.0.1:9/x"
                    "?connect_timeout=2\n")
    code, out, err = run(capsys, "--config-file", str(conf), "db", "version")
    assert (code, out) == (5, "")
    assert err.startswith("vtpcm-manage: error: database error: OperationalError: ")
    assert SECRET not in err and err.count("\n") == 1


def test_db_sync_as_a_command(engine_conf: Path, tmp_path: Path) -> None:
    """The module an operator runs (``python -m``, as the console script)."""
    done = subprocess.run([sys.executable, "-m", "vtpcm_nova.cmd.manage", "--config-file",
                           str(engine_conf), "--format", "json", "db", "sync"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["after"] == f"revision {migration.head()}"
