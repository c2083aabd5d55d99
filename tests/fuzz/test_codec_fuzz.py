"""The payload codec under generated input: a value or a typed error, never anything else.

Decoding takes arbitrary bytes (JSON and msgpack) and answers a value or a ``ValueError``
(msgspec's ``DecodeError``; from msgpack also ``UnicodeDecodeError`` for a str that is not UTF-8),
or ``RecursionError`` for nesting past the parser's limit. Encoding (:meth:`Codec.check_value`)
takes arbitrary Python values and answers bytes or :class:`~conveyor.errors.PayloadError`; what it
accepts decodes back to an equal value; the size cap holds at every size.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conveyor.codec import Codec, Format
from conveyor.errors import PayloadError, PayloadTooLargeError, UnencodablePayloadError
from conveyor.job import Job

from .conftest import fuzz_settings
from .strategies import hostile_text, json_values, loose_values, msgpack_values, nested

FORMATS: tuple[Format, ...] = ("json", "msgpack")
CODECS = {fmt: Codec(fmt) for fmt in FORMATS}
# What a decoder may raise: msgspec.DecodeError and, from msgpack, UnicodeDecodeError (both
# ValueError, which is what conveyor's lenient decoders catch), and RecursionError for too-deep
# nesting (msgspec raises it instead of crashing the interpreter).
DECODE_ERRORS = (ValueError, RecursionError)


def _decode(codec: Codec, data: bytes) -> Any:
    try:
        return codec.decode(data)
    except DECODE_ERRORS:
        return None


def _normal(value: Any) -> Any:
    """What a JSON round trip yields: tuples become lists."""
    if isinstance(value, list | tuple):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return value


def _same(a: Any, b: Any) -> bool:
    """Equality that also tells -0.0 from 0.0 and 1 from 1.0 and True (a lossless round trip)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return bool(a == b)


@pytest.mark.parametrize("fmt", FORMATS)
@fuzz_settings(80)
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_decode_to_a_value_or_a_decode_error(fmt: Format, data: bytes) -> None:
    codec = CODECS[fmt]
    _decode(codec, data)
    with contextlib.suppress(*DECODE_ERRORS):
        codec.decode_job(data)


@pytest.mark.parametrize("fmt", FORMATS)
@fuzz_settings(50)
@given(value=json_values, cut=st.integers(min_value=0, max_value=50), flip=st.integers(0, 255))
def test_damaged_encodings_decode_to_a_value_or_a_decode_error(
    fmt: Format, value: Any, cut: int, flip: int
) -> None:
    """Real encodings truncated or with a byte changed: the decoder's hardest near-misses."""
    codec = CODECS[fmt]
    try:
        data = codec.check_value(value, what="value")
    except PayloadError:
        return  # e.g. a >64-bit integer in msgpack
    truncated = data[: max(0, len(data) - cut)]
    _decode(codec, truncated)
    if data:
        at = cut % len(data)
        _decode(codec, data[:at] + bytes([flip]) + data[at + 1 :])


@pytest.mark.parametrize("fmt", FORMATS)
@fuzz_settings(80)
@given(value=loose_values)
def test_any_python_value_encodes_or_is_refused_with_a_payload_error(
    fmt: Format, value: Any
) -> None:
    codec = CODECS[fmt]
    try:
        data = codec.check_value(value, what="payload")
    except (UnencodablePayloadError, PayloadTooLargeError) as exc:
        refusal = exc.message
    else:
        assert _same(codec.decode(data), _normal(value))
        return
    assert "payload" in refusal  # the message names what was refused


@fuzz_settings(60)
@given(value=json_values)
def test_valid_payloads_round_trip_exactly_in_json(value: Any) -> None:
    codec = CODECS["json"]
    assert _same(codec.decode(codec.check_value(value, what="payload")), value)


@fuzz_settings(60)
@given(value=msgpack_values)
def test_valid_payloads_round_trip_exactly_in_msgpack(value: Any) -> None:
    codec = CODECS["msgpack"]
    assert _same(codec.decode(codec.check_value(value, what="payload")), value)


@fuzz_settings(50)
@given(big=st.integers(min_value=2**64, max_value=2**4000) | st.integers(max_value=-(2**63) - 1))
def test_huge_integers_are_exact_in_json_and_refused_by_msgpack(big: int) -> None:
    json_codec, msgpack_codec = CODECS["json"], CODECS["msgpack"]
    assert json_codec.decode(json_codec.check_value([big], what="payload")) == [big]
    with pytest.raises(UnencodablePayloadError):
        msgpack_codec.check_value([big], what="payload")


@pytest.mark.parametrize("fmt", FORMATS)
@fuzz_settings(50)
@given(text=hostile_text)
def test_strings_with_lone_surrogates_are_refused_others_round_trip(fmt: Format, text: str) -> None:
    codec = CODECS[fmt]
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        with pytest.raises(UnencodablePayloadError):
            codec.check_value({"s": text}, what="payload")
        return
    assert codec.decode(codec.check_value({"s": text}, what="payload")) == {"s": text}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("depth", [1, 63, 64, 65, 66, 500, 5000])
def test_nesting_is_capped_at_64_levels(fmt: Format, depth: int) -> None:
    codec = CODECS[fmt]
    value = nested(depth)
    if depth <= 64:
        assert codec.decode(codec.check_value(value, what="payload")) == value
    else:
        with pytest.raises(UnencodablePayloadError, match="deeper than 64"):
            codec.check_value(value, what="payload")


@pytest.mark.parametrize("fmt", FORMATS)
def test_hostile_nesting_on_the_wire_is_a_decode_error_not_a_crash(fmt: Format) -> None:
    codec = CODECS[fmt]
    wire = {"json": (b"[" * 200_000, b'{"a":' * 100_000), "msgpack": (b"\x91" * 200_000,)}
    for data in wire[fmt]:
        with pytest.raises(DECODE_ERRORS):
            codec.decode(data)


@pytest.mark.parametrize("fmt", FORMATS)
@fuzz_settings(50)
@given(cap=st.integers(min_value=1, max_value=400), value=json_values)
def test_the_size_cap_is_honoured_at_every_size(fmt: Format, cap: int, value: Any) -> None:
    codec = Codec(fmt, max_payload_bytes=cap)
    exact = CODECS[fmt]
    try:
        size = len(exact.check_value(value, what="payload"))
    except UnencodablePayloadError:
        return
    if size <= cap:
        assert len(codec.check_value(value, what="payload")) == size
    else:
        with pytest.raises(PayloadTooLargeError, match=f"{size} bytes"):
            codec.check_value(value, what="payload")


@pytest.mark.parametrize("fmt", FORMATS)
@fuzz_settings(40)
@given(
    args=st.lists(msgpack_values, max_size=3),
    kwargs=st.dictionaries(st.text(max_size=8), msgpack_values, max_size=3),
    task=st.text("abcxyz_.0123", min_size=1, max_size=30),
)
def test_job_records_round_trip(
    fmt: Format, args: list[Any], kwargs: dict[str, Any], task: str
) -> None:
    codec = CODECS[fmt]
    job = Job(id="j1", task=task, queue="default", args=args, kwargs=kwargs)
    codec.check_payload(job)
    back = codec.decode_job(codec.encode_job(job))
    assert (back.task, _same(back.args, args), _same(back.kwargs, kwargs)) == (task, True, True)
