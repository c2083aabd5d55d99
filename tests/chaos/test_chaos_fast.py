"""The fast chaos tier: every scenario once, small counts, real processes and signals.

The full runs (repetitions, bigger counts, soak) are ``python -m conveyor.testing.chaos``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor.testing.chaos.registry import SCENARIOS, run_scenario
from conveyor.testing.redis_server import redis_server_binary

CASES = [(name, kind) for name, (_, kinds) in SCENARIOS.items() for kind in kinds]


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("name", "kind"), CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_scenario_meets_its_goals(name: str, kind: str, tmp_path: Path) -> None:
    if kind == "redis" and redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    outcome = run_scenario(name, kind, tmp_path)
    row = outcome.report.as_row()
    print(f"\n[{name} {kind}] {row} recovery={outcome.recovery_s} exit={outcome.exit_s}")
    assert outcome.ok, "\n".join(outcome.failures)
