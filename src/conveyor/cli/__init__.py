"""The ``conveyor`` command line: one module per subcommand group, wired together in ``main``."""
