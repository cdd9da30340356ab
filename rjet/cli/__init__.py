"""The ``rjet`` command line (needs the ``cli`` extra: ``pip install 'rjet[cli]'``).

``rjet demo`` shows a sharded group at work on an embedded server; ``insert``, ``tail``, ``status``,
``worker`` and ``server`` are the everyday tools. See ``rjet --help`` and ``docs/cli.md``.
"""

from rjet.cli._app import cli, main

__all__ = ["cli", "main"]
