"""Hypothesis strategies shared by the fuzz suites: JSON values, hostile strings, nesting."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

#: Strings that include lone surrogates and control characters (valid Python str, not UTF-8).
hostile_text = st.text(st.characters(codec=None, categories=None), max_size=40)

#: Integers well beyond 64 bits as well as ordinary ones.
huge_ints = st.one_of(st.integers(), st.integers(min_value=2**63 - 2, max_value=2**200))

#: Integers msgpack can hold (64 bits, signed or unsigned).
msgpack_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)


def json_values_with(ints: st.SearchStrategy[int]) -> st.SearchStrategy[Any]:
    """Any JSON value (nested lists and string-keyed objects) whose integers come from ``ints``."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        ints,
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=12,
    )


#: Scalars a JSON document can hold (finite floats only).
json_scalars = st.one_of(
    st.none(), st.booleans(), huge_ints, st.floats(allow_nan=False, allow_infinity=False), st.text()
)
#: Any JSON value, integers of any size.
json_values = json_values_with(huge_ints)
#: Any JSON value that msgpack can also hold.
msgpack_values = json_values_with(msgpack_ints)

#: Python values a caller might pass by mistake: JSON-ish plus what has no JSON form.
loose_scalars = st.one_of(
    json_scalars,
    hostile_text,
    st.floats(),
    st.binary(max_size=8),
    st.complex_numbers(),
    st.sets(st.integers(), max_size=3),
    st.datetimes(),
    st.decimals(),
)
loose_values: st.SearchStrategy[Any] = st.recursive(
    loose_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(
            st.one_of(st.text(max_size=6), st.integers(), st.none()), inner, max_size=4
        ),
    ),
    max_leaves=12,
)


def nested(depth: int, leaf: Any = 0) -> Any:
    """``depth`` levels of alternating lists and objects around ``leaf``."""
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value
