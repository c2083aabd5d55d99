"""Chaos scenarios: conveyor under real faults, checked against an outside ledger.

``python -m conveyor.testing.chaos [--runs N] [--soak-minutes M]`` runs the scenarios of the
reliability plan implemented so far (K1, K2, S2, S6, B1, B5, L3) on every broker they apply to
and prints one table; the fast tier in ``tests/chaos`` runs each once with small counts.

* :mod:`.tasks`: the ledger-recording tasks; :mod:`.worker`: the worker program.
* :mod:`.scenarios`: the scenarios and :func:`~.scenarios.run_scenario`.
"""
