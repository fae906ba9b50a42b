#!/usr/bin/env python3
"""Refuse tests that accept any error where a specific one exists.

``pytest.raises(Exception)`` or ``pytest.raises(VTPCMException)`` (the
project's base class) passes whatever goes wrong first: a zero-byte envelope
refused by the envelope check satisfies a test meant for the generation
check. A test must name the refusal it expects (type, then reason). This
walks the AST of every test file and reports each ``pytest.raises``,
``self.assertRaises`` or ``assertRaisesRegex`` whose expected type is one of
the broad classes, alone or in a tuple.

A test whose subject IS the base class (an unknown remote error mapped to
it) marks the line ``# broad-raises-ok: <why>``; the check then asserts
nothing about that call, so the test must check ``type(err.value)`` itself.

Usage: tools/check_test_raises.py [PATH ...]   (default: tests benchmarks)
Exit status 1 when anything is found.
"""

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

BROAD = frozenset({"Exception", "BaseException", "VTPCMException"})
RAISERS = frozenset({"raises", "assertRaises", "assertRaisesRegex"})


def _name(node: ast.expr) -> str:
    """Last dotted component: ``exception.VTPCMException`` -> ``VTPCMException``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _expected(node: ast.expr) -> list[ast.expr]:
    return list(node.elts) if isinstance(node, ast.Tuple) else [node]


def findings(path: Path) -> Iterator[str]:
    """``path:line: message`` for each broad expected exception in ``path``."""
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text, filename=str(path))
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and _name(node.func) in RAISERS):
            continue
        if "# broad-raises-ok: " in lines[node.lineno - 1]:
            continue
        args = list(node.args[:1]) + [k.value for k in node.keywords
                                      if k.arg in ("expected_exception", "exception")]
        for arg in args:
            for item in _expected(arg):
                if _name(item) in BROAD:
                    yield ("%s:%d: %s(%s) accepts any error; name the specific "
                           "exception and assert its reason" % (
                               path, node.lineno, _name(node.func), _name(item)))


def main(argv: list[str]) -> int:
    roots = [Path(a) for a in argv] or [Path("tests"), Path("benchmarks")]
    files = sorted(p for r in roots for p in ([r] if r.is_file() else r.rglob("*.py")))
    found = [f for p in files for f in findings(p)]
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
