"""Timing spans: off they are one shared do-nothing object; on (a
benchmark's VTPCM_SPANS) every span is one JSON line of label and time."""

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vtpcm_common import spans


@pytest.fixture
def span_dir(tmp_path: Path) -> Iterator[Path]:
    spans.configure(str(tmp_path))
    try:
        yield tmp_path
    finally:
        spans.configure(None)


def lines(directory: Path) -> list[dict[str, object]]:
    text = (directory / ("%d.jsonl" % os.getpid())).read_text()
    return [json.loads(line) for line in text.splitlines()]


def test_off_by_default_and_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(spans.ENV, raising=False)
    spans.configure_from_env()
    assert not spans.enabled()
    assert spans.span("a") is spans.span("b")  # one shared no-op, nothing recorded
    with spans.span("a"):
        pass


def test_on_each_span_is_one_line_with_label_and_duration(span_dir: Path) -> None:
    @spans.timed("decorated")
    def work(x: int) -> int:
        return x + 1

    with spans.span("rpc:begin"):
        assert work(1) == 2
    got = lines(span_dir)
    assert [g["label"] for g in got] == ["decorated", "rpc:begin"]
    assert all(isinstance(g["ms"], float) and g["ms"] >= 0 for g in got)
    assert got[1]["ms"] >= got[0]["ms"]  # the outer span holds the inner one
    assert set(got[0]) == {"label", "at", "ms", "thread"}  # labels and times only


def test_a_span_records_also_when_the_block_raises(span_dir: Path) -> None:
    with pytest.raises(ValueError, match="boom"), spans.span("failing"):
        raise ValueError("boom")
    assert [g["label"] for g in lines(span_dir)] == ["failing"]


def test_the_environment_turns_them_on(monkeypatch: pytest.MonkeyPatch,
                                       tmp_path: Path) -> None:
    monkeypatch.setenv(spans.ENV, str(tmp_path))
    spans.configure_from_env()
    try:
        assert spans.enabled()
        with spans.span("db:commit"):
            pass
    finally:
        spans.configure(None)
    assert [g["label"] for g in lines(tmp_path)] == ["db:commit"]
    assert not spans.enabled()


@pytest.mark.parametrize("raises", [True, False])
def test_a_failing_sink_never_replaces_the_blocks_outcome(
        monkeypatch: pytest.MonkeyPatch, raises: bool) -> None:
    """Spans on and the disk full (/dev/full: every write is ENOSPC): the
    block's own exception reaches the caller, and a block that succeeds
    still succeeds; only the timing line is lost."""
    full = open("/dev/full", "a", buffering=1, encoding="utf-8")  # noqa: SIM115
    try:
        with pytest.raises(OSError, match="No space left"):  # the planted control
            full.write("x\n")
        monkeypatch.setattr(spans, "_sink", full)
        if raises:
            with pytest.raises(LookupError, match="^the real refusal$"), \
                    spans.span("tpm:quote"):
                raise LookupError("the real refusal")
        else:
            with spans.span("tpm:quote"):
                pass
    finally:
        monkeypatch.setattr(spans, "_sink", None)
        try:
            full.close()
        except OSError:
            pass
