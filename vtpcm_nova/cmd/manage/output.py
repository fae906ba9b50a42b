"""Rendering of command results: an aligned table or ``--format json``.

Why apart: commands return data only; scripts get stable JSON keys, and
every cell or message is kept on one line without terminal control
characters (an engine answer is not trusted to be printable).
"""

import json
import re
import sys
from collections.abc import Mapping
from typing import IO, Any

from vtpcm_nova.cmd.manage.results import Data, Listing

_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def one_line(text: str) -> str:
    """Keep a cell or message on one line, without terminal control characters."""
    return _UNPRINTABLE.sub("?", text.replace("\r\n", " ").replace("\n", " "))


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        return ",".join(str(k) for k in value) or "-"
    if isinstance(value, (list, tuple)):
        return ",".join(cell(v) for v in value) or "-"
    return one_line(str(value))


def _aligned(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                   + "\n" for r in rows)


def render_table(data: Data) -> str:
    if isinstance(data, Listing):
        header = [c.upper() for c in data.columns]
        return _aligned([header] + [[cell(r.get(c)) for c in data.columns]
                                    for r in data.rows])
    pairs = [["FIELD", "VALUE"]]
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            pairs.extend([f"{key}[{k}]", cell(v)] for k, v in value.items())
        else:
            pairs.append([key, cell(value)])
    return _aligned(pairs)


def render(data: Data, fmt: str, out: IO[str]) -> None:
    if fmt == "json":
        payload = data.rows if isinstance(data, Listing) else data
        out.write(json.dumps(payload, indent=2) + "\n")
    else:
        out.write(render_table(data))


def progress(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()
