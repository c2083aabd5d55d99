"""The parts of bench/load.py: reliability plan 7.7's load rows T1-T8, one module per kind."""
