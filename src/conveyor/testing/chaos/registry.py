"""Every chaos scenario by id, and :func:`run_scenario`.

Each family module (``scenarios`` for the first ones, then ``crash``, ``shutdown``,
``brokerfaults``, ``liveness``, ``poison``, ``races``) exports its own ``SCENARIOS`` table;
this module merges them in plan order (K, S, B, L, P, D, Y, then the T6 soak).

:data:`PR_TIER` names the scenarios the plan marks (P): ``make test`` runs those once with small
counts on every broker; ``make chaos`` runs them all at full counts, then the soak.
"""

from __future__ import annotations

from pathlib import Path

from conveyor.testing.chaos import (
    brokerfaults,
    crash,
    liveness,
    poison,
    races,
    scenarios,
    shutdown,
    soak,
)
from conveyor.testing.chaos.scenarios import Env, Outcome, Scenario

_FAMILIES = [
    scenarios.SCENARIOS,
    crash.SCENARIOS,
    shutdown.SCENARIOS,
    soak.SCENARIOS,
    poison.SCENARIOS,
    races.SCENARIOS,
    brokerfaults.SCENARIOS,
    liveness.SCENARIOS,
]

SCENARIOS: dict[str, tuple[Scenario, tuple[str, ...]]] = {
    name: entry
    for name, entry in sorted(
        ((n, e) for family in _FAMILIES for n, e in family.items()),
        key=lambda item: ("KSBLPDYT".index(item[0][0]), int(item[0][1:])),
    )
}


#: The pull-request tier, run by ``make test``: the plan's rows marked (P), and S6 and L3.
#: (D4, the state machine, is tests/chaos/test_control_races.py.)
PR_TIER = frozenset(
    {"K1", "K4", "S1", "S2", "S5", "S6", "B1", "B3", "B8", "L1", "L3", "L4", "P1", "P2", "P3", "D1"}
)

#: ``make chaos`` (``--full``) sizes: K1 holds 1,000 jobs in flight with the default 10 s lease,
#: B1 restarts Redis 20 times, B4 and B8 run 2 minutes each, S6 stops 50 idle workers; the
#: others scale their counts by the default factor 4.
FULL_SIZE: dict[str, int] = {"K1": 20, "B1": 20, "B4": 2, "B8": 2, "S6": 25}


def full_size(name: str) -> int:
    """The ``size`` a scenario runs at in the full tier."""
    return FULL_SIZE.get(name, 4)


def run_scenario(name: str, kind: str, workdir: Path, size: int = 1) -> Outcome:
    """Run scenario ``name`` once on broker ``kind``; errors become failures, never escapes."""
    fn, kinds = SCENARIOS[name]
    if kind not in kinds:
        raise ValueError(f"{name} does not apply to {kind} (only {', '.join(kinds)})")
    outcome = Outcome(name, kind)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        with Env(kind, workdir, outcome) as env:
            fn(env, size)
    except Exception as exc:
        outcome.failures.append(f"error: {type(exc).__name__}: {exc}")
    return outcome


__all__ = ["FULL_SIZE", "PR_TIER", "SCENARIOS", "full_size", "run_scenario"]
