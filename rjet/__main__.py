"""``python -m rjet`` and the ``rjet`` console script: the command line, when its extra is installed."""

from __future__ import annotations

import sys


def main() -> None:
    """Run the ``rjet`` command line, or say how to install it (exit status 2)."""
    try:
        from rjet.cli import main as cli_main
    except ModuleNotFoundError as e:
        missing = (e.name or "").partition(".")[0]
        if missing not in ("click", "rich"):
            raise
        print(
            f"rjet: the command line needs the 'cli' extra ({missing} is missing): pip install 'rjet[cli]'"
            " (in a checkout: pip install -e '.[cli]')",
            file=sys.stderr,
        )
        sys.exit(2)
    cli_main()


if __name__ == "__main__":
    main()
