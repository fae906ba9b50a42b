"""The ``vtpcm-manage`` parser as the CLI reference documents it.

Why not ``build_parser`` directly: every sub-command carries the exit-code
table as a plain-text epilog for ``--help``, and sphinx-argparse parses
sub-command epilogs as reStructuredText even with ``:noepilog:`` (which it
honours only for the top-level parser). The reference shows that table once,
written as reST (``cli/vtpcm-manage.rst``), so here the epilogs are dropped.
"""

from __future__ import annotations

import argparse

from vtpcm_nova.cmd import manage


def _drop_epilogs(parser: argparse.ArgumentParser) -> None:
    parser.epilog = None
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _drop_epilogs(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = manage.build_parser()
    _drop_epilogs(parser)
    return parser
