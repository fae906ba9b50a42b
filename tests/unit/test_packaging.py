"""What the wheel installs: the product, not the lab (issue 7, point 6)."""

from pathlib import Path

from setuptools.config.setupcfg import read_configuration

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_packages_exclude_the_lab() -> None:
    options = read_configuration(str(ROOT / "setup.cfg"))["options"]
    packages = set(options["packages"])
    assert {"vtpcm_common", "vtpcm_agent", "vtpcm_nova"} <= packages
    assert not [p for p in packages if p.split(".")[0] == "vtpcm_lab"]
    assert "vtpcm_lab" not in options.get("package_data", {})
