"""Fate: explicit probability, seedable, fixed variants for tests."""

from __future__ import annotations

import pytest

import rjet


def test_never_and_always() -> None:
    rjet.NEVER.tempt()
    with pytest.raises(rjet.Tempted):
        rjet.ALWAYS.tempt()
    assert isinstance(rjet.NEVER, rjet.Fate)


def test_random_fate_strikes_with_its_probability_and_repeats_with_its_seed() -> None:
    def outcomes(seed: int) -> list[bool]:
        fate = rjet.RandomFate(0.2, seed=seed)
        out = []
        for _ in range(5000):
            try:
                fate.tempt()
                out.append(False)
            except rjet.Tempted:
                out.append(True)
        assert fate.tempted == sum(out)
        return out

    a = outcomes(1)
    assert a == outcomes(1)
    assert a != outcomes(2)
    assert 850 < sum(a) < 1150  # 1000 expected, sd 28


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_probability_outside_zero_one_is_refused(p: float) -> None:
    with pytest.raises(rjet.ConfigError, match="probability"):
        rjet.RandomFate(p)


def test_p_zero_never_strikes_and_p_one_always_does() -> None:
    for _ in range(100):
        rjet.RandomFate(0).tempt()
    with pytest.raises(rjet.Tempted):
        rjet.RandomFate(1).tempt()
