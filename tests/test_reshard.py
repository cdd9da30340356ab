"""Resharding's decision, a pure function of what is stored: table tests without a server."""

from __future__ import annotations

from typing import Any

import pytest

from rjet._progress import decode_done, encode_done
from rjet.cursors import CursorRecord
from rjet.parallel._reshard import plan

NOW = 1_000.0


def cursors(**by_shard: tuple[str, int]) -> dict[int, tuple[str, int]]:
    """{shard index: (cursor, revision)} from s0=..., s1=..."""
    return {int(k[1:]): v for k, v in by_shard.items()}


CASES: list[tuple[str, dict[str, Any]]] = [
    (
        "a first run records n and seeds nothing",
        {
            "state": None,
            "generations": {},
            "current": {},
            "want_record": {"n": 3, "seed": "", "fresh_from": 0},
            "want_todo": (),
        },
    ),
    (
        "steady state with every cursor present does nothing",
        {
            "state": {"n": 3, "seed": "", "fresh_from": 0},
            "generations": {},
            "current": cursors(s0=("5", 1), s1=("6", 2), s2=("7", 3)),
            "want_record": None,
            "want_todo": (),
        },
    ),
    (
        "steady state finishes a reshard another process started: missing and stale cursors are seeded",
        {
            "state": {"n": 3, "seed": "40", "fresh_from": 10},
            "generations": {},
            "current": cursors(s0=("41", 12), s2=("9", 4)),
            "want_record": None,
            "want_todo": (1, 2),
            "want_seed": "40",
        },
    ),
    (
        "n changed: every new shard is seeded with the lowest cursor of the old generation",
        {
            "state": {"n": 2, "seed": "", "fresh_from": 0},
            "generations": {2: cursors(s0=("70", 5), s1=("55", 6))},
            "current": {},
            "want_record": {"n": 3, "seed": "55", "fresh_from": 1, "from": 2, "at": NOW},
            "want_todo": (0, 1, 2),
            "want_seed": "55",
            "want_report": True,
        },
    ),
    (
        "n changed back: old cursors of this n are from an earlier generation and are seeded too",
        {
            "state": {"n": 2, "seed": "", "fresh_from": 0},
            "generations": {2: cursors(s0=("90", 20), s1=("80", 21))},
            "current": cursors(s0=("10", 3), s1=("11", 4), s2=("12", 5)),
            "want_record": {"n": 3, "seed": "80", "fresh_from": 6, "from": 2, "at": NOW},
            "want_todo": (0, 1, 2),
            "want_seed": "80",
            "want_report": True,
        },
    ),
    (
        "a generation missing a shard's cursor bounds the seed at the beginning",
        {
            "state": {"n": 2, "seed": "", "fresh_from": 0},
            "generations": {2: cursors(s0=("70", 5))},
            "current": {},
            "want_record": {"n": 3, "seed": "", "fresh_from": 1, "from": 2, "at": NOW},
            "want_todo": (0, 1, 2),
            "want_seed": "",
            "want_report": True,
        },
    ),
    (
        "no record but old cursors (before generations were recorded): only missing shards are seeded",
        {
            "state": None,
            "generations": {2: cursors(s0=("70", 5), s1=("60", 6))},
            "current": cursors(s1=("65", 7)),
            "want_record": {"n": 3, "seed": "60", "fresh_from": 0, "from": 2, "at": NOW},
            "want_todo": (0, 2),
            "want_seed": "60",
            "want_report": True,
        },
    ),
    (
        "no record, old cursors, every current cursor present: kept as they are, noted",
        {
            "state": None,
            "generations": {2: cursors(s0=("70", 5), s1=("60", 6))},
            "current": cursors(s0=("1", 7), s1=("2", 8), s2=("3", 9)),
            "want_record": {"n": 3, "seed": "60", "fresh_from": 0, "from": 2, "at": NOW},
            "want_todo": (),
            "want_seed": "60",
            "want_unrecorded": {"g_1_of_2": "70", "g_2_of_2": "60"},
        },
    ),
]


@pytest.mark.parametrize(("case", "spec"), CASES, ids=[c for c, _ in CASES])
def test_plan(case: str, spec: dict[str, Any]) -> None:
    step = plan("g", 3, spec["state"], spec["generations"], spec["current"], {"s@1"}, now=NOW)
    assert step.record == spec["want_record"]
    assert step.todo == spec["want_todo"]
    if "want_seed" in spec:
        assert step.seed.cursor == spec["want_seed"]
    assert (step.report is not None) == spec.get("want_report", False)
    assert step.unrecorded == spec.get("want_unrecorded", {})


def test_seeds_count_in_the_stream_of_the_old_cursors_when_there_is_one() -> None:
    state = {"n": 2, "seed": "", "fresh_from": 0}
    old = {2: {0: ("70", 5), 1: ("55", 6)}}
    assert plan("g", 3, state, old, {}, {"s@1"}, now=NOW).seed == CursorRecord("55", "s@1")
    assert plan("g", 3, state, old, {}, {"s@1", "s@2"}, now=NOW).seed == CursorRecord("55", None)
    report = plan("g", 3, state, old, {}, set(), now=NOW).report
    assert report is not None
    assert report.seeded == ("g_1_of_3", "g_2_of_3", "g_3_of_3")


def test_a_reshard_carries_the_old_shards_exact_progress_above_the_seed() -> None:
    state = {"n": 2, "seed": "", "fresh_from": 0}
    old = {2: {0: ("70", 5), 1: ("55", 6)}}
    # Shard 0 (cursor 70) had 72 and 75 done; shard 1 (cursor 55) had 57 and 60.
    dones = {2: {0: encode_done(70, [72, 75]), 1: encode_done(55, [57, 60])}}
    step = plan("g", 3, state, old, {}, {"s@1"}, now=NOW, dones=dones)
    assert step.seed.cursor == "55"
    assert step.seed.done is not None
    assert decode_done(55, step.seed.done) == {57, 60, 72, 75}
    assert step.record is not None
    assert step.record["done"] == step.seed.done  # a process finishing the reshard seeds the same
    assert step.report is not None
    assert step.report.done_carried == 4
    assert "4 event(s) after it recorded as done are not handled again" in step.report.describe()
    # Finishing it from the record: the steady-state branch seeds the missing shard alike.
    again = plan("g", 3, step.record, {}, {0: ("55", 9), 1: ("55", 10)}, {"s@1"}, now=NOW)
    assert again.todo == (2,)
    assert again.seed.done == step.seed.done


def test_an_unreadable_done_set_is_left_out_of_a_reshard() -> None:
    state = {"n": 2, "seed": "", "fresh_from": 0}
    old = {2: {0: ("70", 5), 1: ("55", 6)}}
    step = plan("g", 3, state, old, {}, {"s@1"}, now=NOW, dones={2: {0: "x!", 1: encode_done(55, [57])}})
    assert step.seed.done is not None
    assert decode_done(55, step.seed.done) == {57}
