"""Conformance-suite plumbing: the one place where capability gaps turn into skips.

A test that needs a capability says so with ``@pytest.mark.requires_capability("durable")``;
the gate below reads ``broker.capabilities`` and skips brokers that declare it False. Tests
never skip ad hoc.
"""

from __future__ import annotations

import pytest

from conveyor.brokers.base import Broker


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "requires_capability(*names): run only on brokers whose capabilities.<name> is true",
    )


@pytest.fixture(autouse=True)
def _capability_gate(request: pytest.FixtureRequest) -> None:
    marker = request.node.get_closest_marker("requires_capability")
    if marker is None:
        return
    broker: Broker = request.getfixturevalue("broker")
    for name in marker.args:
        if not getattr(broker.capabilities, name):  # an unknown name fails loudly here
            pytest.skip(f"{type(broker).__name__} declares capabilities.{name} = False")
