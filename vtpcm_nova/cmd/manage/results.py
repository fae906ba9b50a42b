"""What every vtpcm-manage command returns: an exit code and its data.

Why apart: commands, rendering and the wiring all speak these types, and
scripts rely on the exit codes, so they are defined once.
"""

import argparse
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from oslo_config import cfg

from vtpcm_common import exception
from vtpcm_common.api.engine.rpcapi import EngineAPI
from vtpcm_common.wire import Message

PROG = "vtpcm-manage"

EXIT_OK = 0
EXIT_NEGATIVE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_REFUSED = 4
EXIT_UNREACHABLE = 5

EPILOG = """\
exit codes:
  0  success
  1  the operation ran but the answer is negative
     (hosts attest: at least one host is not TRUSTED)
  2  usage or configuration error
  3  not found
  4  refused or invalid (invalid input, host not trusted, illegal transition...)
  5  engine unreachable (no reply in time, transport error; db: the database)
"""


@dataclasses.dataclass(frozen=True)
class Listing:
    """Rows of one kind: JSON prints every key, the table only ``columns``."""

    columns: tuple[str, ...]
    rows: list[dict[str, Any]]


Data = Listing | dict[str, Any]
Result = tuple[int, Data]
# a call to the running engine
Command = Callable[[EngineAPI, argparse.Namespace], Result]
# no engine, no configuration files (keys create)
LocalCommand = Callable[[argparse.Namespace], Result]
# no engine, but the engine's configuration (db sync, db version)
ConfCommand = Callable[[cfg.ConfigOpts, argparse.Namespace], Result]


def to_json(value: Any) -> Any:
    """Message -> JSON-safe value with stable keys (field names, bytes as hex)."""
    if isinstance(value, Message):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Mapping):
        keys = sorted(value, key=lambda k: (not isinstance(k, int), k))
        return {str(k): to_json(value[k]) for k in keys}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


def listing(columns: tuple[str, ...], items: Sequence[Message]) -> Listing:
    return Listing(columns, [cast(dict[str, Any], to_json(i)) for i in items])


def one(item: Message) -> dict[str, Any]:
    return cast(dict[str, Any], to_json(item))


def error_code(err: exception.VTPCMException) -> int:
    if isinstance(err, exception.ServiceUnreachable):
        return EXIT_UNREACHABLE
    return EXIT_NOT_FOUND if isinstance(err, exception.NotFound) else EXIT_REFUSED
