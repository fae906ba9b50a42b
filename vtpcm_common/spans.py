"""Timing spans for the benchmarks: where a protocol step's time goes.

Why here: a migration step crosses processes (engine, two agents, swtpm),
so the chokepoints every step goes through (an RPC call and its serving, a
database commit, a host TPM command, an fsync, a swtpm start, a seal) each
hold one ``span``. Off, which is the default and every deployment, a span
is a shared do-nothing context manager: one global read and two empty
calls. ``benchmarks/protocol.py`` turns them on in the daemons it starts
(``VTPCM_SPANS=<directory>`` in their environment, read by
``configure_from_env`` at daemon start); each process then appends one JSON
line per span to ``<directory>/<pid>.jsonl``: its label, wall-clock start
and duration. Labels are method names and fixed words, never data.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import ParamSpec, TextIO, TypeVar

ENV = "VTPCM_SPANS"
P = ParamSpec("P")
R = TypeVar("R")


class _Off:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None


_OFF = _Off()
_sink: TextIO | None = None
_lock = threading.Lock()


class _On:
    __slots__ = ("label", "wall", "start")

    def __init__(self, label: str) -> None:
        self.label = label

    def __enter__(self) -> None:
        self.wall = time.time()
        self.start = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        took = time.perf_counter() - self.start
        line = json.dumps({"label": self.label, "at": self.wall, "ms": took * 1000,
                           "thread": threading.get_ident()})
        with _lock:
            if _sink is not None:
                try:
                    _sink.write(line + "\n")
                except (OSError, ValueError):
                    # a full disk or closed sink loses this timing line, never the
                    # block's own outcome (its exception, or its success)
                    pass


def span(label: str) -> _Off | _On:
    """``with span("rpc:begin"): ...`` times the block when spans are on."""
    return _OFF if _sink is None else _On(label)


def timed(label: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: every call of the function is one ``span(label)``."""
    def wrap(func: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(func)
        def inner(*args: P.args, **kwargs: P.kwargs) -> R:
            with span(label):
                return func(*args, **kwargs)
        return inner
    return wrap


def enabled() -> bool:
    return _sink is not None


def configure(directory: str | None) -> None:
    """Record this process's spans under ``directory``; None turns them off."""
    global _sink
    with _lock:
        if _sink is not None:
            _sink.close()
            _sink = None
        if directory:
            path = Path(directory) / ("%d.jsonl" % os.getpid())
            _sink = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115


def configure_from_env() -> None:
    """At daemon start: spans on only if the benchmark asked (``VTPCM_SPANS``)."""
    configure(os.environ.get(ENV) or None)
