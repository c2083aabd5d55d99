"""The circuit breaker and backoff used around the worker's broker calls."""

from __future__ import annotations

import logging

import pytest

from conveyor.errors import BrokerUnavailable
from conveyor.worker.circuit import BACKOFF_CAP_S, Backoff, Circuit


def test_backoff_doubles_from_a_tenth_of_a_second_up_to_the_cap() -> None:
    backoff = Backoff()
    delays = [backoff.next_delay() for _ in range(8)]
    assert 0.09 <= delays[0] <= 0.11
    assert 0.18 <= delays[1] <= 0.22
    assert all(d <= BACKOFF_CAP_S * 1.1 for d in delays)
    assert delays[-1] >= BACKOFF_CAP_S * 0.9
    backoff.reset()
    assert backoff.next_delay() <= 0.11


def test_a_circuit_logs_each_state_change_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="conveyor.worker.circuit")
    circuit = Circuit("fetcher", "w1")
    for _ in range(50):
        circuit.failure(BrokerUnavailable("down"))
    assert circuit.is_open
    assert circuit.snapshot()["failures"] == 50
    circuit.success()
    circuit.success()
    assert not circuit.is_open
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "broker unavailable in fetcher" in messages[0]
    assert "reachable again in fetcher" in messages[1]
    assert [getattr(r, "action", None) for r in caplog.records] == [
        "circuit_open",
        "circuit_closed",
    ]


def test_a_closed_circuit_starts_backing_off_from_the_first_delay_again() -> None:
    circuit = Circuit("reaper")
    for _ in range(10):
        circuit.failure(BrokerUnavailable())
    circuit.success()
    assert circuit.failure(BrokerUnavailable()) <= 0.11
