"""Chaos scenarios: conveyor under real faults, checked against an outside ledger.

``python -m conveyor.testing.chaos [--runs N] [--soak-minutes M]`` runs the scenarios of the
reliability plan on every broker they apply to and prints one table; the fast tier in
``tests/chaos`` runs each once with small counts.

* :mod:`.tasks`: the ledger-recording tasks; :mod:`.worker`: the worker program.
* :mod:`.scenarios`: the harness (:class:`~.scenarios.Env`) and the first scenarios.
* :mod:`.registry`: every scenario by id, and :func:`~.registry.run_scenario`.
"""
