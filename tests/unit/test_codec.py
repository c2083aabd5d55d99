"""Codec: exact-round-trip payloads only, offending path named, size cap, msgpack option."""

from __future__ import annotations

import datetime
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conveyor.codec import Codec
from conveyor.errors import ConfigurationError, PayloadTooLargeError, UnencodablePayloadError
from conveyor.job import Job, JobState, Priority

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
@given(value=json_values)
def test_json_values_round_trip_exactly(fmt: str, value: object) -> None:
    codec = Codec(fmt)  # type: ignore[arg-type]
    assert codec.decode(codec.check_value(value, what="v")) == value


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ({"when": datetime.date(2024, 1, 1)}, "payload['when']"),
        ([1, {2: "x"}], "key 2 is a int"),
        ([1, [object()]], "payload[1][0]"),
        ({"n": math.nan}, "not a finite number"),
        ({"s": {1, 2}}, "builtins.set"),
        (b"raw", "builtins.bytes"),
    ],
)
def test_unencodable_values_are_refused_naming_the_field(value: object, fragment: str) -> None:
    with pytest.raises(UnencodablePayloadError) as info:
        Codec().check_value(value, what="payload")
    assert fragment in str(info.value)
    assert "pass str, int, float, bool, None, list or dict" in str(info.value)


def test_json_keeps_big_integers_and_msgpack_refuses_them_clearly() -> None:
    big = 2**70
    assert Codec("json").decode(Codec("json").check_value(big, what="v")) == big
    with pytest.raises(UnencodablePayloadError, match="as msgpack"):
        Codec("msgpack").check_value([big], what="v")


def test_a_lone_surrogate_is_refused_as_unencodable() -> None:
    with pytest.raises(UnencodablePayloadError):
        Codec().check_value({"s": "\ud800"}, what="v")


def test_payload_over_the_cap_is_refused_with_its_size() -> None:
    codec = Codec(max_payload_bytes=100)
    with pytest.raises(PayloadTooLargeError) as info:
        codec.check_value("x" * 200, what="payload")
    assert "100-byte cap" in str(info.value)


def test_job_record_round_trips() -> None:
    codec = Codec()
    job = Job(
        id="a",
        task="t",
        args=[1],
        kwargs={"k": "v"},
        priority=Priority.HIGH,
        state=JobState.SCHEDULED,
        run_at_ms=5,
    )
    assert codec.decode_job(codec.encode_job(job)) == job


def test_unknown_format_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        Codec("pickle")  # type: ignore[arg-type]


def test_pickle_is_never_imported_by_the_codec() -> None:
    from pathlib import Path

    import conveyor.codec as module

    source = Path(module.__file__).read_text(encoding="utf-8")
    assert "import pickle" not in source
