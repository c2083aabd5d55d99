"""Payload and record encoding: JSON by default (msgspec), msgpack optional, never pickle.

A payload is accepted only if it round-trips exactly: str, int, float (finite), bool, None,
lists/tuples and dicts with string keys. Anything else is refused at enqueue with the path of the
offending value, so a task receives exactly what its caller passed.
"""

from __future__ import annotations

import math
from typing import Any, Final, Literal

import msgspec

from conveyor.errors import ConfigurationError, PayloadTooLargeError, UnencodablePayloadError
from conveyor.job import Job

DEFAULT_MAX_PAYLOAD_BYTES: Final = 1024 * 1024
Format = Literal["json", "msgpack"]

_SCALARS: Final = (str, bool, int, type(None))


def _find_unencodable(value: Any, path: str, depth: int = 0) -> str | None:
    """Return a description of the first value under ``path`` that has no exact JSON form."""
    if depth > 64:
        return f"{path}: nested deeper than 64 levels"
    if isinstance(value, _SCALARS):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path}: {value!r} is not a finite number"
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = _find_unencodable(item, f"{path}[{i}]", depth + 1)
            if found:
                return found
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path}: key {key!r} is a {type(key).__name__}, not a str"
            found = _find_unencodable(item, f"{path}[{key!r}]", depth + 1)
            if found:
                return found
        return None
    return f"{path}: a {type(value).__module__}.{type(value).__qualname__} has no JSON form"


class _JobHead(msgspec.Struct):
    """The identifying fields of a job record (other fields ignored): enough to dead-letter it."""

    id: str
    task: str
    queue: str = "default"


class UndecodablePayload(list[Any]):
    """The (empty) args of a stored job whose payload cannot be decoded; ``reason`` says why.

    A broker reading such a job hands it over with these args instead of failing the whole read,
    so one corrupt record cannot stop a worker's reserve loop; the runner dead-letters it.
    """

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason


class Codec:
    """Encodes job records and values, enforcing the payload rules and the size cap.

    Args:
        format: ``json`` (default) or ``msgpack``.
        max_payload_bytes: the largest encoded args+kwargs (and result) accepted; default 1 MiB.
    """

    def __init__(
        self, format: Format = "json", max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    ) -> None:
        if format == "json":
            self._encoder: msgspec.json.Encoder | msgspec.msgpack.Encoder = msgspec.json.Encoder()
            self._job_decoder: Any = msgspec.json.Decoder(Job)
            self._any_decoder: Any = msgspec.json.Decoder()
            self._head_decoder: Any = msgspec.json.Decoder(_JobHead)
        elif format == "msgpack":
            self._encoder = msgspec.msgpack.Encoder()
            self._job_decoder = msgspec.msgpack.Decoder(Job)
            self._any_decoder = msgspec.msgpack.Decoder()
            self._head_decoder = msgspec.msgpack.Decoder(_JobHead)
        else:
            raise ConfigurationError(f"unknown serializer {format!r}; use 'json' or 'msgpack'")
        if max_payload_bytes < 1:
            raise ConfigurationError("max_payload_bytes must be at least 1")
        self.format: Format = format
        self.max_payload_bytes = max_payload_bytes

    def check_value(self, value: Any, *, what: str) -> bytes:
        """Encode ``value`` (``what`` names it in errors) once it is known to round-trip; cap it."""
        found = _find_unencodable(value, what)
        if found:
            raise UnencodablePayloadError(
                f"cannot encode {found}; pass str, int, float, bool, None, list or dict "
                "(convert other values yourself, e.g. datetime.isoformat())"
            )
        try:
            data = self._encoder.encode(value)
        except (OverflowError, TypeError, UnicodeEncodeError, msgspec.EncodeError) as exc:
            # e.g. msgpack has no integers beyond 64 bits; a lone surrogate has no UTF-8 form
            raise UnencodablePayloadError(
                f"cannot encode {what} as {self.format}: {exc}; pass smaller numbers or strings"
            ) from None
        if len(data) > self.max_payload_bytes:
            raise PayloadTooLargeError(
                f"{what} encodes to {len(data)} bytes, over the {self.max_payload_bytes}-byte cap; "
                "store large data elsewhere (a file, a database) and pass a reference"
            )
        return data

    def check_payload(self, job: Job) -> None:
        """Check a job's args and kwargs (raises :class:`UnencodablePayloadError` or too large)."""
        self.check_value([job.args, job.kwargs], what=f"job {job.task}(...) payload")

    def decode_payload(self, data: bytes | str) -> tuple[list[Any], dict[str, Any]]:
        """Decode a stored ``[args, kwargs]`` payload (UndecodablePayload args if it cannot be)."""
        try:
            args, kwargs = self._any_decoder.decode(data)
        except (msgspec.DecodeError, ValueError, TypeError) as exc:
            return UndecodablePayload(
                f"DecodeError: the stored payload cannot be decoded: {exc}"
            ), {}
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            return UndecodablePayload("DecodeError: the stored payload is not [args, kwargs]"), {}
        return args, kwargs

    def decode_job_lenient(self, data: bytes | str) -> Job | None:
        """Decode a job record whose payload may be corrupt; None if even its id is unreadable."""
        try:
            return self.decode_job(data)
        except (msgspec.DecodeError, ValueError, TypeError) as exc:
            reason = f"DecodeError: the stored record cannot be decoded: {exc}"
        try:
            head = self._head_decoder.decode(data)
        except (msgspec.DecodeError, ValueError, TypeError):
            return None
        return Job(id=head.id, task=head.task, queue=head.queue, args=UndecodablePayload(reason))

    def encode_job(self, job: Job) -> bytes:
        """Encode a whole job record."""
        return self._encoder.encode(job)

    def decode_job(self, data: bytes | str) -> Job:
        """Decode a job record (msgspec.DecodeError for any bytes that are not one)."""
        try:
            return self._job_decoder.decode(data)  # type: ignore[no-any-return]
        except (UnicodeDecodeError, RecursionError) as exc:
            raise msgspec.DecodeError(f"undecodable job record: {type(exc).__name__}") from exc

    def encode(self, value: Any) -> bytes:
        """Encode a value that is already known to be valid."""
        return self._encoder.encode(value)

    def decode(self, data: bytes | str) -> Any:
        """Decode a value (msgspec.DecodeError for any bytes that are not one).

        msgpack text that is not UTF-8 and pathologically deep nesting surface from msgspec as
        UnicodeDecodeError and RecursionError; callers handle one error type.
        """
        try:
            return self._any_decoder.decode(data)
        except (UnicodeDecodeError, RecursionError) as exc:
            raise msgspec.DecodeError(f"undecodable value: {type(exc).__name__}") from exc
