"""Argument types of vtpcm-manage: each refuses bad input with a message
naming what was wrong, before anything is sent to the engine."""

import argparse
import re
from typing import Any, cast

SHA256_HEX = 64
MAX_PCR = 23


def pcr_index(text: str) -> int:
    try:
        index = int(text.strip(), 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"PCR index {text!r} is not an integer") from None
    if not 0 <= index <= MAX_PCR:
        raise argparse.ArgumentTypeError(f"PCR index {index} is not between 0 and {MAX_PCR}")
    return index


def pcr_list(text: str) -> tuple[int, ...]:
    """``0,1,2`` -> (0, 1, 2); duplicates and empty lists are refused."""
    parts = [p for p in text.split(",")]
    if not text.strip() or any(not p.strip() for p in parts):
        raise argparse.ArgumentTypeError(f"PCR list {text!r} must be like 0,1,2,7")
    indices = [pcr_index(p) for p in parts]
    if len(set(indices)) != len(indices):
        raise argparse.ArgumentTypeError(f"PCR list {text!r} names a PCR twice")
    return tuple(sorted(indices))


def pcr_value(text: str) -> tuple[int, bytes]:
    """``16=<64 hex digits>`` -> (16, digest): one golden sha256 PCR value."""
    index_text, sep, digest_text = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"PCR value {text[:80]!r} must be INDEX=HEX")
    index = pcr_index(index_text)
    digest_text = digest_text.strip()
    if len(digest_text) != SHA256_HEX or not re.fullmatch(r"[0-9A-Fa-f]+", digest_text):
        raise argparse.ArgumentTypeError(
            f"PCR {index} value must be {SHA256_HEX} hex digits (sha256)")
    return index, bytes.fromhex(digest_text)


class PcrValues(argparse.Action):
    """Collect repeated ``--pcr I=HEX`` into one dict, refusing an index given twice."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        index, digest = cast(tuple[int, bytes], values)
        current = dict(getattr(namespace, self.dest, None) or {})
        if index in current:
            raise argparse.ArgumentError(self, f"PCR {index} given twice")
        current[index] = digest
        setattr(namespace, self.dest, current)


def audit_limit(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"limit {text!r} is not an integer") from None
    if not 1 <= value <= 10000:
        raise argparse.ArgumentTypeError("limit must be between 1 and 10000")
    return value


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"timeout {text!r} is not a number") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError("timeout must be between 0 and 3600 seconds")
    return value
