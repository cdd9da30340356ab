"""shard_of and shard_name: pinned vectors (the mapping is stable forever) and properties."""

from __future__ import annotations

import collections

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

import rjet
from rjet.parallel import shard_name, shard_of
from rjet.parallel._shard import key_filter

# (foreign id, xxh3_64 of its UTF-8 bytes, shard_of for n = 1, 2, 3, 4, 8, 16, 1000).
# These pin the mapping: a change here moves keys between shards of running deployments.
VECTORS = [
    ("", 3244421341483603138, [0, 0, 1, 2, 2, 2, 138]),  # XXH3_64("") = 0x2D06800538D394C2, the spec's vector
    ("a", 16629034431890738719, [0, 1, 1, 3, 7, 15, 719]),
    ("user-42", 5836184775705692621, [0, 1, 2, 1, 5, 13, 621]),
    ("order-17", 2543671532102667198, [0, 0, 0, 2, 6, 14, 198]),
    ("0", 1838281907459330133, [0, 1, 0, 1, 5, 5, 133]),
    ("ünïcødé", 8574713759769602705, [0, 1, 2, 1, 1, 1, 705]),
    ("日本語", 1296689438140682423, [0, 1, 2, 3, 7, 7, 423]),
    ("🙂 emoji", 717638054471533126, [0, 0, 1, 2, 6, 6, 126]),
    ("x" * 100, 14486255910912052802, [0, 0, 2, 2, 2, 2, 802]),
]
NS = [1, 2, 3, 4, 8, 16, 1000]


@pytest.mark.parametrize(("fid", "digest", "shards"), VECTORS)
def test_pinned_vectors(fid: str, digest: int, shards: list[int]) -> None:
    assert xxhash.xxh3_64_intdigest(fid.encode("utf-8")) == digest
    assert [shard_of(fid, n) for n in NS] == shards


def test_shard_name_is_reflex_convention() -> None:
    assert shard_name("mailer", 0, 3) == "mailer_1_of_3"
    assert shard_name("mailer", 2, 3) == "mailer_3_of_3"
    assert shard_name("a b", 0, 1) == "a b_1_of_1"


@pytest.mark.parametrize("n", [0, -1, 1.5, "2", True, None])
def test_bad_n(n: object) -> None:
    with pytest.raises(rjet.ConfigError, match="n must be an int >= 1"):
        shard_of("a", n)  # type: ignore[arg-type]
    with pytest.raises(rjet.ConfigError):
        shard_name("a", 0, n)  # type: ignore[arg-type]


@pytest.mark.parametrize(("m", "n"), [(-1, 2), (2, 2), (True, 2), (0.0, 2)])
def test_bad_shard_index(m: object, n: int) -> None:
    with pytest.raises(rjet.ConfigError, match="shard index"):
        shard_name("a", m, n)  # type: ignore[arg-type]


def test_bad_name() -> None:
    with pytest.raises(rjet.ConfigError, match="name"):
        shard_name("", 0, 1)


@given(st.text(), st.integers(min_value=1, max_value=10_000))
def test_shard_of_is_the_documented_formula(fid: str, n: int) -> None:
    try:
        raw = fid.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: never an event's foreign ID
        return
    m = shard_of(fid, n)
    assert 0 <= m < n
    assert m == xxhash.xxh3_64_intdigest(raw) % n
    assert shard_of(fid, n) == m  # deterministic


@given(st.text(st.characters(exclude_categories=["Cs"])), st.integers(min_value=1, max_value=64))
def test_exactly_one_shard_takes_each_key(fid: str, n: int) -> None:
    takers = [m for m in range(n) if key_filter(m, n)(fid)]
    assert takers == [shard_of(fid, n)]


@given(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1), st.integers(1, 64))
def test_a_shard_filter_names_its_formula_for_the_reader(fid: str, n: int) -> None:
    """The stream client hashes a plain foreign ID's raw header bytes itself when the filter says it
    is (m, n): that must be the same decision the filter makes."""
    for m in range(n):
        f = key_filter(m, n)
        assert type(f) is rjet.ShardFilter  # the type the reader recognises
        assert (f.m, f.n) == (m, n)
        assert f(fid) == (xxhash.xxh3_64_intdigest(fid.encode("ascii")) % n == m)


@given(st.text(min_size=1), st.integers(min_value=1, max_value=10_000), st.data())
def test_shard_name_format(name: str, n: int, data: st.DataObject) -> None:
    m = data.draw(st.integers(min_value=0, max_value=n - 1))
    assert shard_name(name, m, n) == f"{name}_{m + 1}_of_{n}"


def test_keys_spread_evenly() -> None:
    n = 8
    counts = collections.Counter(shard_of(f"user-{i}", n) for i in range(80_000))
    assert set(counts) == set(range(n))
    assert all(abs(c - 10_000) < 500 for c in counts.values()), counts
