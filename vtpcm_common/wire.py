"""Schema-checked RPC messages: one frozen dataclass per RPC method.

oslo.messaging carries JSON, so a message crosses the wire as a flat dict of
JSON scalars (bytes as base64). ``from_wire`` accepts exactly the declared
fields, checks every type and bound, and raises ``InvalidPayload`` naming the
field; nothing is half-parsed. Secret fields (``secret=True``) are left out
of ``repr`` so that a message logged by accident carries no key material.
"""

import base64
import binascii
import dataclasses
import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Self, TypeVar

from vtpcm_common import exception

MAX_BLOB = 256 * 1024
_HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")

Checker = Callable[[Any], Any]


class _Reject(Exception):
    """Internal: a checker's reason, turned into InvalidPayload by the caller."""


def _uuid(value: Any) -> str:
    if not isinstance(value, str):
        raise _Reject("must be a uuid string")
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        raise _Reject("is not a valid uuid") from None
    return str(parsed)


def _host(value: Any) -> str:
    if not isinstance(value, str) or not _HOST_RE.fullmatch(value):
        raise _Reject("must be a host name ([A-Za-z0-9._-], at most 253 characters)")
    return value


def _int(minimum: int, maximum: int) -> Checker:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Reject("must be an integer")
        if not minimum <= value <= maximum:
            raise _Reject(f"must be between {minimum} and {maximum}")
        return value
    return check


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Reject("must be a boolean")
    return value


def _text(max_len: int = 255, pattern: str | None = None) -> Checker:
    compiled = re.compile(pattern) if pattern else None

    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise _Reject("must be a string")
        if len(value) > max_len:
            raise _Reject(f"is longer than {max_len} characters")
        if compiled and not compiled.fullmatch(value):
            raise _Reject("has an invalid format")
        return value
    return check


def _choice(*choices: str) -> Checker:
    def check(value: Any) -> str:
        if value not in choices:
            raise _Reject("must be one of " + ", ".join(choices))
        return str(value)
    return check


def _blob(max_len: int = MAX_BLOB, min_len: int = 0) -> Checker:
    """Bytes travel as base64 text; bounds apply to the decoded size."""
    def check(value: Any) -> bytes:
        if isinstance(value, bytes):
            raw = value
        elif isinstance(value, str):
            if len(value) > (max_len * 4) // 3 + 4:
                raise _Reject(f"is larger than {max_len} bytes")
            try:
                raw = base64.b64decode(value.encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError):
                raise _Reject("is not valid base64") from None
        else:
            raise _Reject("must be base64 text")
        if not min_len <= len(raw) <= max_len:
            raise _Reject(f"must be {min_len} to {max_len} bytes long")
        return raw
    return check


def _int_list(minimum: int, maximum: int, max_items: int = 24) -> Checker:
    item = _int(minimum, maximum)

    def check(value: Any) -> tuple[int, ...]:
        if not isinstance(value, (list, tuple)) or len(value) > max_items:
            raise _Reject(f"must be a list of at most {max_items} integers")
        items = tuple(item(v) for v in value)
        if len(set(items)) != len(items):
            raise _Reject("has duplicate entries")
        return tuple(sorted(items))
    return check


def _optional(inner: Checker) -> Checker:
    def check(value: Any) -> Any:
        return None if value is None else inner(value)
    return check


def _message(cls: "type[Message]") -> Checker:
    def check(value: Any) -> Message:
        if isinstance(value, cls):
            return value
        try:
            return cls.from_wire(value)
        except exception.InvalidPayload as err:
            raise _Reject(err.kwargs.get("field", "?") + " " + err.kwargs.get("reason", "")) \
                from None
    return check


def _message_list(cls: "type[Message]", max_items: int = 10000) -> Checker:
    return _list(_message(cls), max_items)


def _blob_map(max_items: int, key: Checker, value: Checker) -> Checker:
    """A JSON object (keys are text on the wire) of checked keys and values."""
    def check(raw: Any) -> dict[Any, Any]:
        if not isinstance(raw, Mapping) or len(raw) > max_items:
            raise _Reject(f"must be an object of at most {max_items} entries")
        return {key(k): value(v) for k, v in raw.items()}
    return check


def _digit_key(minimum: int, maximum: int) -> Checker:
    def check(value: Any) -> int:
        text = str(value)
        if not (text.isascii() and text.isdigit() and len(text) <= len(str(maximum))) \
                or not minimum <= int(text) <= maximum:
            raise _Reject(f"has a key outside {minimum}-{maximum}")
        return int(text)
    return check


def _list(item: Checker, max_items: int = 10000) -> Checker:
    def check(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, (list, tuple)) or len(value) > max_items:
            raise _Reject(f"must be a list of at most {max_items} entries")
        return tuple(item(v) for v in value)
    return check


list_field = _list
message_field = _message
message_list_field = _message_list
map_field = _blob_map
digit_key = _digit_key
uuid_field = _uuid
host_field = _host
int_field = _int
bool_field = _bool
text_field = _text
choice_field = _choice
blob_field = _blob
int_list_field = _int_list
optional = _optional


def field(check: Checker, *, secret: bool = False, default: Any = dataclasses.MISSING,
          omit_default: bool = False) -> Any:
    """Declare a message field with its checker; ``secret`` hides it from repr.
    ``omit_default``: a field added in a later API version, left out of the
    wire form while it has its ``default``, so that a peer of the older
    version still accepts the message as it did."""
    return dataclasses.field(
        default=default, repr=not secret,
        metadata={"check": check, "secret": secret, "omit_default": omit_default})


M = TypeVar("M", bound="Message")


@dataclasses.dataclass(frozen=True)
class Message:
    """Base of every RPC payload; subclasses are frozen dataclasses."""

    message_type: ClassVar[str] = "message"

    @classmethod
    def from_wire(cls, payload: Any) -> Self:
        if not isinstance(payload, Mapping):
            raise exception.InvalidPayload(
                message_type=cls.message_type, field="(payload)", reason="must be an object")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(payload) - set(fields))
        if unknown:
            raise exception.InvalidPayload(
                message_type=cls.message_type, field=str(unknown[0])[:64],
                reason="is not a known field")
        values: dict[str, Any] = {}
        for name, spec in fields.items():
            if name not in payload:
                if (spec.default is dataclasses.MISSING
                        and spec.default_factory is dataclasses.MISSING):
                    raise exception.InvalidPayload(
                        message_type=cls.message_type, field=name, reason="is missing")
                continue
            try:
                values[name] = spec.metadata["check"](payload[name])
            except _Reject as reject:
                raise exception.InvalidPayload(
                    message_type=cls.message_type, field=name, reason=str(reject)) from None
        return cls(**values)

    def to_wire(self) -> dict[str, Any]:
        return {spec.name: _encode(getattr(self, spec.name))
                for spec in dataclasses.fields(self)
                if not (spec.metadata.get("omit_default")
                        and getattr(self, spec.name) == spec.default)}

    def validated(self) -> Self:
        """Round-trip through the checkers: the sender checks what it sends."""
        return type(self).from_wire(self.to_wire())


def _encode(value: Any) -> Any:
    """Python value -> JSON-safe value (bytes as base64, nested messages as dicts)."""
    if isinstance(value, Message):
        return value.to_wire()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}
    return value
