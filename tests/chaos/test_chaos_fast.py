"""The fast chaos tier: the plan's (P) scenarios once, small counts, real processes and signals.

The others, the full counts and the soak run from ``make chaos`` (``python -m
conveyor.testing.chaos``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor.testing.chaos.registry import PR_TIER, SCENARIOS, run_scenario
from conveyor.testing.redis_server import redis_server_binary

CASES = [
    (name, kind) for name, (_, kinds) in SCENARIOS.items() if name in PR_TIER for kind in kinds
]


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("name", "kind"), CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_scenario_meets_its_goals(name: str, kind: str, tmp_path: Path) -> None:
    if kind.startswith("redis") and redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    outcome = run_scenario(name, kind, tmp_path)
    row = outcome.report.as_row()
    print(f"\n[{name} {kind}] {row} recovery={outcome.recovery_s} exit={outcome.exit_s}")
    assert outcome.ok, "\n".join(outcome.failures)


def test_the_fast_tier_names_only_registered_scenarios() -> None:
    assert PR_TIER.issubset(SCENARIOS)
