"""Subcommands of the ``maskrcnn`` command: one module each, with ``add_parser`` and ``run``."""
