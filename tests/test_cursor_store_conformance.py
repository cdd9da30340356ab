"""rjet.testing.check_cursor_store, the conformance check of the cursor-store contract: rjet's own
stores pass it (MemCursorStore, JetStreamCursorStore on a real server), and stores that break a rule
fail it with a message naming the capability and the step."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from nats.js import JetStreamContext

import rjet
from rjet.cursors import ClaimingCursorStore
from rjet.cursors._memory import _MemClaim
from rjet.testing import check_cursor_store

StoreFactory = Callable[[], Awaitable[rjet.CursorStore]]


def same(store: rjet.CursorStore) -> StoreFactory:
    """A store in memory is its own storage: "another process's store" is the same instance."""

    async def factory() -> rjet.CursorStore:
        return store

    return factory


@pytest.fixture
def jetstream(js: JetStreamContext, name: str) -> StoreFactory:
    """A new JetStreamCursorStore over this test's own bucket each call (check_cursor_store closes them)."""

    async def factory() -> rjet.CursorStore:
        return await rjet.JetStreamCursorStore.create(js, name, flush_interval=0.05)

    return factory


async def test_the_memory_store_keeps_the_contract() -> None:
    await check_cursor_store(same(rjet.MemCursorStore()))


async def test_the_jetstream_store_keeps_the_contract(jetstream: StoreFactory) -> None:
    await check_cursor_store(jetstream)


async def test_the_jetstream_store_with_a_claim_lease_keeps_the_contract(js: JetStreamContext, name: str) -> None:
    async def factory() -> rjet.CursorStore:
        return await rjet.JetStreamCursorStore.create(js, name, flush_interval=0.05, claim_lease=5.0)

    await check_cursor_store(factory)


class DictStore:
    """A plain CursorStore (get, set, flush; no claims): checked on those alone."""

    def __init__(self, cursors: dict[str, str]) -> None:
        self.cursors = cursors
        self.buffered: dict[str, str] = {}

    async def get_cursor(self, name: str) -> str:
        return self.cursors.get(name, "")

    async def set_cursor(self, name: str, cursor: str) -> None:
        self.buffered[name] = cursor

    async def flush(self) -> None:
        self.cursors.update(self.buffered)
        self.buffered.clear()


async def test_a_plain_store_is_checked_on_get_set_and_flush() -> None:
    shared: dict[str, str] = {}

    async def factory() -> rjet.CursorStore:
        return DictStore(shared)  # a new store over the same storage each time

    assert not isinstance(DictStore(shared), ClaimingCursorStore)
    await check_cursor_store(factory)
    assert shared["_conformance.dotted.name.v2"] == "100"


# ----------------------------------------------------------------- stores that break a rule


class Forgetful(rjet.MemCursorStore):
    """A flush that loses what was set."""

    async def flush(self) -> None:
        self.cursors.clear()


class Unfenced(rjet.MemCursorStore):
    """Declares fencing, but a newer claim leaves the older one writing."""

    async def claim(self, name: str, *, owner: str | None = None, after: str | None = None) -> _MemClaim:
        self._claims.pop(name, None)  # the older claim is not told
        return await super().claim(name, owner=owner, after=after)

    def _holds(self, claim: _MemClaim) -> None:
        claim.check()  # a write never looks whose the stored record is


class NoProgress(rjet.MemCursorStore):
    """Declares exact progress, but a claim never hands back the events done above the cursor."""

    async def claim(self, name: str, *, owner: str | None = None, after: str | None = None) -> _MemClaim:
        claim = await super().claim(name, owner=owner, after=after)
        claim.done = None
        return claim


class Streamless(rjet.MemCursorStore):
    """Forgets the stream a cursor counts in (run could not raise StreamRecreated through it)."""

    async def claim(self, name: str, *, owner: str | None = None, after: str | None = None) -> _MemClaim:
        claim = await super().claim(name, owner=owner, after=after)
        claim.stream = None
        return claim


class Strangers(rjet.MemCursorStore):
    """Takes a record its own runner wrote through another claim (a write that was applied though
    its answer was lost) for another runner's: the runner's next run then stops on its own write."""

    def __init__(self) -> None:
        super().__init__()
        self.strangers: set[str] = set()

    async def claim(self, name: str, *, owner: str | None = None, after: str | None = None) -> _MemClaim:
        if after is not None and name in self.strangers:
            raise rjet.CursorConflict(name, f"another runner wrote it (owner {after}); this one stops")
        old = self._claims.get(name)
        if old is not None and old.owner == owner and old.lost is None:
            self.strangers.add(name)
        return await super().claim(name, owner=owner, after=after)


async def _fails(store: rjet.CursorStore, *phrases: str) -> str:
    with pytest.raises(AssertionError) as caught:
        await check_cursor_store(same(store))
    message = str(caught.value)
    for phrase in phrases:
        assert phrase in message, message
    return message


async def test_a_store_that_forgets_fails() -> None:
    await _fails(Forgetful(), "get/set/flush: set, flush, read back by a new store: a new store read ''")


async def test_a_store_that_does_not_fence_fails_naming_fencing() -> None:
    message = await _fails(Unfenced(), "fencing: the first claim's write after another owner's claim")
    assert "raised nothing, not CursorConflict" in message


async def test_a_store_that_drops_exact_progress_fails_naming_it() -> None:
    await _fails(NoProgress(), "exact_progress: a ProgressSource's snapshot comes back", "done None")


async def test_a_store_that_forgets_the_stream_fails_naming_it() -> None:
    await _fails(Streamless(), "stream identity: claim.stream is stored with the cursor")


async def test_a_store_that_does_not_settle_its_own_write_fails() -> None:
    await _fails(Strangers(), "fencing: a write by the same owner through another store is its own", "CursorConflict")


async def test_a_capability_not_declared_is_not_checked() -> None:
    class PlainClaims(Unfenced):
        capabilities = rjet.cursors.Capabilities(fencing=False, exact_progress=True)

    await check_cursor_store(same(PlainClaims()))
