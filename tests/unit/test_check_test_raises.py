"""The lint check that refuses tests accepting any error finds each broad
form and leaves specific ones alone."""

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "check_test_raises", Path(__file__).parents[2] / "tools" / "check_test_raises.py")
assert _SPEC is not None and _SPEC.loader is not None
check = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(check)


@pytest.mark.parametrize("line", [
    "with pytest.raises(Exception): f()",
    "with pytest.raises(BaseException, match='x'): f()",
    "with pytest.raises(exception.VTPCMException) as err: f()",
    "with pytest.raises(VTPCMException): f()",
    "with pytest.raises((ValueError, Exception)): f()",
    "with pytest.raises(expected_exception=Exception): f()",
    "self.assertRaises(exception.VTPCMException, f)",
    "self.assertRaisesRegex(Exception, 'x', f)",
])
def test_broad_expectations_are_found(tmp_path: Path, line: str) -> None:
    path = tmp_path / "test_x.py"
    path.write_text(line + "\n")
    assert len(list(check.findings(path))) == 1
    assert check.main([str(path)]) == 1


def test_specific_expectations_pass(tmp_path: Path) -> None:
    path = tmp_path / "test_x.py"
    path.write_text("with pytest.raises(exception.GenerationMismatch, match='x'): f()\n"
                    "with pytest.raises((ValueError, KeyError)): f()\n"
                    "self.assertRaises(exception.SealError, f)\n")
    assert list(check.findings(path)) == []
    assert check.main([str(path)]) == 0


def test_a_marked_line_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "test_x.py"
    path.write_text("with pytest.raises(VTPCMException):  # broad-raises-ok: the subject\n"
                    "    f()\n"
                    "with pytest.raises(VTPCMException):  # no marker\n"
                    "    f()\n")
    assert [f.split(":")[1] for f in check.findings(path)] == ["3"]


def test_the_tree_is_clean() -> None:
    root = Path(__file__).parents[2]
    assert check.main([str(root / "tests"), str(root / "benchmarks")]) == 0
