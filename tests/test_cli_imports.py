"""The command line imports only public names (issue #25): what it needs, a tool of a user's own may
need too, so it gets it from rjet's public surface (``rjet.wire``, ``rjet.parallel``...), never from a
private module.

A public name is one in the ``__all__`` of a module whose path has no component with a leading
underscore (or such a module itself). rjet.cli's own modules are exempt: they are the command line.
"""

from __future__ import annotations

import ast
import doctest
import importlib
from pathlib import Path
from types import ModuleType

import pytest

import rjet
import rjet.cli

CLI = Path(rjet.cli.__file__).parent


def _private(dotted: str) -> bool:
    return any(part.startswith("_") for part in dotted.split("."))


def _own(dotted: str) -> bool:
    return dotted == "rjet.cli" or dotted.startswith("rjet.cli.")


def _module(dotted: str) -> ModuleType | None:
    try:
        return importlib.import_module(dotted)
    except ImportError:
        return None


def _exported(module: str, name: str) -> bool:
    """Whether ``module.name`` is public: in the module's ``__all__``, or a public submodule."""
    mod = _module(module)
    if mod is None:
        return False
    if name in getattr(mod, "__all__", ()):
        return True
    return not name.startswith("_") and _module(f"{module}.{name}") is not None


def _dotted(node: ast.expr) -> str | None:
    """``rjet.parallel.admin`` for that attribute chain; None for one not rooted at a name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def _from_import(node: ast.ImportFrom, package: str) -> list[str]:
    if node.level:  # relative: resolved against the package
        base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        module = f"{base}.{node.module}" if node.module else base
    else:
        module = node.module or ""
    if not (module == "rjet" or module.startswith("rjet.")) or _own(module):
        return []
    found = []
    for alias in node.names:
        if _own(f"{module}.{alias.name}"):
            continue
        if _private(f"{module}.{alias.name}"):
            found.append(f"from {module} import {alias.name} (a private name)")
        elif not _exported(module, alias.name):
            found.append(f"from {module} import {alias.name} (not in its __all__)")
    return found


def _import(node: ast.Import) -> list[str]:
    return [
        f"import {alias.name} (a private module)"
        for alias in node.names
        if alias.name.startswith("rjet.") and not _own(alias.name) and _private(alias.name)
    ]


def _attribute(dotted: str) -> list[str]:
    """``rjet.X.Y`` after ``import rjet``: each step public, up to the first that is not a module."""
    if not dotted.startswith("rjet.") or _own(dotted):
        return []
    parts = dotted.split(".")
    for i in range(1, len(parts)):
        module, name = ".".join(parts[:i]), parts[i]
        if _module(module) is None or (name.startswith("__") and name.endswith("__")):
            break  # past the modules: an attribute of a public object, or a dunder (__version__)
        if not _exported(module, name):
            return [f"{dotted} ({module}.{name} is not public)"]
    return []


def violations(source: str, filename: str, package: str = "rjet.cli") -> list[str]:
    """``file:line: what`` for every use of a private rjet name in ``source`` (a module of ``package``)."""
    found: list[str] = []
    inner: set[int] = set()  # attributes inside a chain already checked whole (ast.walk goes outside in)
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.ImportFrom):
            what = _from_import(node, package)
        elif isinstance(node, ast.Import):
            what = _import(node)
        elif isinstance(node, ast.Attribute) and id(node) not in inner:
            chain: ast.expr = node.value
            while isinstance(chain, ast.Attribute):
                inner.add(id(chain))
                chain = chain.value
            dotted = _dotted(node)
            what = [] if dotted is None else _attribute(dotted)
        else:
            continue
        found += (f"{filename}:{node.lineno}: {w}" for w in what)
    return found


MODULES: list[Path] = sorted(CLI.glob("*.py"))


def test_the_check_reads_the_command_lines_modules() -> None:
    # Not an empty parametrisation that passes by checking nothing.
    assert {"__init__.py", "_bench_run.py", "_deadletters.py", "_demo.py", "_insert.py", "_tail.py"} <= {
        p.name for p in MODULES
    }


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_the_command_line_imports_only_public_names(path: Path) -> None:
    source = path.read_text(encoding="utf-8")
    assert violations(source, str(path.relative_to(CLI.parent.parent))) == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "from rjet._nats.frames import check_type\n",
            "x.py:1: from rjet._nats.frames import check_type (a private name)",
        ),
        (
            "import rjet\nfrom rjet.parallel._shard import key_filter\n",
            "x.py:2: from rjet.parallel._shard import key_filter",
        ),
        ("from rjet import _tasks\n", "x.py:1: from rjet import _tasks (a private name)"),
        ("from rjet.parallel import _shard\n", "x.py:1: from rjet.parallel import _shard (a private name)"),
        ("import rjet._tasks\n", "x.py:1: import rjet._tasks (a private module)"),
        ("def f():\n    from rjet._tasks import cancel_and_wait\n", "x.py:2: from rjet._tasks import cancel_and_wait"),
        ("from .. import _tasks\n", "x.py:1: from rjet import _tasks (a private name)"),
        ("from ..reader import _filter\n", "x.py:1: from rjet.reader import _filter (a private name)"),
        # public-looking, but rjet.stream's own import of a private helper:
        (
            "from rjet.stream import encode_header_block\n",
            "x.py:1: from rjet.stream import encode_header_block (not in",
        ),
        (
            "import rjet\nrjet._tasks.cancel_and_wait\n",
            "x.py:2: rjet._tasks.cancel_and_wait (rjet._tasks is not public)",
        ),
        ("import rjet\nrjet.parallel._shard.key_filter\n", "x.py:2: rjet.parallel._shard.key_filter"),
    ],
)
def test_the_check_names_file_and_line_of_a_private_import(source: str, expected: str) -> None:
    found = violations(source, "x.py")
    assert len(found) == 1
    assert found[0].startswith(expected)


@pytest.mark.parametrize(
    "source",
    [
        "import rjet\nrjet.Stream\nrjet.__version__\nrjet.parallel.admin.sequence_at\n",
        "from rjet.cli._common import run\nfrom . import _common\nfrom ._demo_check import Checker\n",
        "from rjet.parallel import admin, shard_of\nfrom rjet.wire import guard_api\nimport rjet.parallel.admin\n",
        "import nats.js._private\nfrom nats.aio.client import Client\n",  # not rjet's: ruff's SLF001 guards those
    ],
)
def test_the_check_lets_public_names_and_the_clis_own_modules_pass(source: str) -> None:
    assert violations(source, "x.py") == []


def test_the_wire_modules_examples_run_as_written() -> None:
    # rjet.wire is where the command line's wire helpers went public: its docstring is their manual.
    import rjet.wire

    result = doctest.testmod(rjet.wire, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 9
    assert result.failed == 0
