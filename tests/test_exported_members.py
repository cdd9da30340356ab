"""The public surface is exactly what __all__ says, sorted, and every name is documented."""

from __future__ import annotations

import importlib
import inspect

import pytest


@pytest.mark.parametrize("module", ["rjet", "rjet.parallel", "rjet.reader", "rjet.testing", "rjet.wire"])
def test_all_is_sorted_and_complete(module: str) -> None:
    mod = importlib.import_module(module)
    names = mod.__all__
    # ruff's RUF022 order: CONSTANTS, then Classes, then functions.
    assert names == sorted(names, key=lambda n: (not n.isupper(), not n[:1].isupper(), n))
    public = {n for n in vars(mod) if not n.startswith("_") and not isinstance(getattr(mod, n), type(mod))}
    assert public - {"annotations"} == set(names)
    for n in names:
        obj = getattr(mod, n)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__, f"{module}.{n} has no docstring"


def test_every_error_is_an_rjet_error() -> None:
    import rjet

    for n in rjet.__all__:
        obj = getattr(rjet, n)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, rjet.RjetError), n
