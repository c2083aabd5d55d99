"""Every chaos scenario by id, and :func:`run_scenario`.

Each family module (``scenarios`` for the first ones, then ``crash``, ``shutdown``,
``brokerfaults``, ``liveness``, ``poison``, ``races``) exports its own ``SCENARIOS`` table;
this module merges them in plan order (K, S, B, L, P, D, Y).
"""

from __future__ import annotations

from pathlib import Path

from conveyor.testing.chaos import scenarios
from conveyor.testing.chaos.scenarios import Env, Outcome, Scenario

_FAMILIES = [scenarios.SCENARIOS]

SCENARIOS: dict[str, tuple[Scenario, tuple[str, ...]]] = {
    name: entry
    for name, entry in sorted(
        ((n, e) for family in _FAMILIES for n, e in family.items()),
        key=lambda item: ("KSBLPDY".index(item[0][0]), int(item[0][1:])),
    )
}


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


__all__ = ["SCENARIOS", "run_scenario"]
