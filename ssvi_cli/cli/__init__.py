"""The ``ssvi`` command line: thin Typer commands over the library, the only code that prints or
exits. ``app`` registers one module per command (``train``, ``evaluate``, ``export``, ``infer``,
``inspect_cmd``, ``bench``, ``presets``, ``sweep``); ``console`` holds the two consoles, ``common``
the tables, progress bars and checks the commands share."""

from ssvi_cli.cli.app import app, main, run

__all__ = ["app", "main", "run"]
