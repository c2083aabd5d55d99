"""libFuzzer (atheris) harness for the payload codec: ``python fuzz/atheris_codec.py -runs=N``.

Each input is decoded as JSON and as msgpack (values and job records). Allowed: a value,
``ValueError`` (msgspec's DecodeError, UnicodeDecodeError from msgpack) or ``RecursionError`` for
too-deep nesting. A decoded value must then either be refused by ``check_value`` with a
``PayloadError`` or survive an exact round trip. Anything else is a crash libFuzzer reports.
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Any

import atheris

with atheris.instrument_imports(include=["conveyor"]):
    from conveyor.codec import Codec
    from conveyor.errors import PayloadError

CODECS = (Codec("json"), Codec("msgpack"), Codec("json", max_payload_bytes=64))
DECODE_ERRORS = (ValueError, RecursionError)


def same(a: Any, b: Any) -> bool:
    """Exact equality: types, -0.0 and nesting included."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return bool(a == b)


def test_one_input(data: bytes) -> None:
    """One libFuzzer input through every codec."""
    for codec in CODECS:
        try:
            value = codec.decode(data)
        except DECODE_ERRORS:
            value = None
        else:
            try:
                encoded = codec.check_value(value, what="payload")
            except PayloadError:
                pass
            else:
                if not same(codec.decode(encoded), value):
                    raise AssertionError(f"round trip changed {value!r}")
        with contextlib.suppress(*DECODE_ERRORS):
            codec.decode_job(data)


def main() -> None:
    """Run libFuzzer with the command line's options (``-runs=N``, ``-max_total_time=S``...)."""
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
