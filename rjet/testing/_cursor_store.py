"""The conformance check of the cursor-store contract: :func:`check_cursor_store`."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NoReturn

from rjet._progress import encode_done
from rjet.cursors import Capabilities, Claim, ClaimingCursorStore, CursorStore, runner_id
from rjet.errors import CursorConflict, RjetError

__all__ = ["check_cursor_store"]

_PREFIX = "_conformance"
_ODD_NAMES = (  # names a store keeps as they are, whatever its keys allow
    f"{_PREFIX}.dotted.name.v2",
    f"{_PREFIX} with spaces",
    f"{_PREFIX} ü/ key*",
    f"{_PREFIX}..empty.token.",
    f"{_PREFIX}.日本語.>",
    f"{_PREFIX}." + "long" * 50,
    f"{_PREFIX}.ü" + "é" * 100,
)
_STREAM = "conformance@2026-12-07T11:16:33.000001+00:00"  # a stream identity, as readers report one
_WAIT = 5.0  # seconds a claim is given to notice its loss


async def check_cursor_store(make_store: Callable[[], Awaitable[CursorStore]]) -> None:
    """Check a cursor store against rjet's whole cursor-store contract; ``AssertionError`` naming the
    capability and the step that broke it (``"fencing: a write after another owner's claim: ..."``).

    ``make_store`` is an async callable; each ``await make_store()`` opens a store over the same
    backing storage, as another process (or a restart) would: what one store flushed, the next one
    reads. The storage should start empty of the names used here (they start with ``_conformance``).
    A store kept in this process's memory is its own storage: return the same instance each time
    (``rjet.MemCursorStore``). Every store made is closed at the end (``await store.close()``, when it
    has one).

    Every store (:class:`rjet.CursorStore`): ``get_cursor`` of a name never set is ""; the last
    ``set_cursor`` before a ``flush`` is what a new store reads; a second ``flush`` is harmless; a
    cursor set back to "" reads back ""; names with dots, empty tokens, spaces, ``/``, ``*``, ``>``,
    non-ASCII letters, and long names, are kept apart and read back.

    A :class:`rjet.cursors.ClaimingCursorStore` also, whatever it declares: a claim of a name never
    written has cursor "" and the given ``owner`` (a new non-empty one when None), is held (``lost``
    None, ``check()`` quiet, ``wait_lost`` waits) and releases; a cursor set through a claim and
    released (``release`` flushes) is read back by a new store, through a claim and through
    ``get_cursor``; the stream identity set on ``claim.stream`` is stored with the cursor and is the
    next claim's ``stream``, which keeps it for its own writes. Then by its declared
    :class:`rjet.cursors.Capabilities`:

    - ``exact_progress``: a :class:`rjet.cursors.ProgressSource` given to ``set_cursor`` is stored as
      its ``(cursor, done)`` snapshot and comes back as the next claim's ``cursor`` and ``done``; a
      plain cursor written after it clears ``done`` (no progress above it is claimed).
    - ``fencing``: a claim by another owner through another store fences the first: its next
      ``set_cursor`` and ``flush``, or its ``confirm``, raise :class:`rjet.CursorConflict` naming the
      new owner, its ``lost`` is set and ``wait_lost`` returns; its ``release`` then raises nothing
      and writes nothing, while the new claim writes on. ``claim(name, owner=me, after=me)`` takes
      back a record that still carries ``me`` (a runner's next run), even one written by another
      store with the same owner (a write that was applied though its answer was lost: an ambiguous
      write, settled as the runner's own), and raises ``CursorConflict`` naming the other owner when
      another owner claimed it meanwhile.

    ::

        from rjet.testing import check_cursor_store

        async def test_my_store_keeps_the_contract(database_url: str) -> None:
            async def make_store() -> MySqlCursorStore:
                return await MySqlCursorStore.connect(database_url, table="cursors")

            await check_cursor_store(make_store)

        async def test_the_memory_store() -> None:
            store = rjet.MemCursorStore()

            async def same() -> rjet.MemCursorStore:
                return store  # memory is its own storage: "another process" is the same instance

            await check_cursor_store(same)
    """
    check = _Check(make_store)
    try:
        await check.plain()
        first = check.made[0]
        if isinstance(first, ClaimingCursorStore):
            caps = first.capabilities
            if not isinstance(caps, Capabilities):
                raise AssertionError(
                    f"capabilities: a ClaimingCursorStore declares rjet.cursors.Capabilities, not {caps!r}"
                )
            await check.claims()
            await check.stream_identity()
            if caps.exact_progress:
                await check.exact_progress()
            if caps.fencing:
                await check.fencing()
                await check.confirm_fenced()
                await check.same_owner_again()
                await check.ambiguous_write()
    except BaseException:
        with contextlib.suppress(Exception):
            await check.close()
        raise
    await check.close()


class _Progress:
    """A :class:`rjet.cursors.ProgressSource` with a fixed snapshot."""

    def __init__(self, cursor: str, done: str) -> None:
        self.value = (cursor, done)

    def snapshot(self) -> tuple[str, str]:
        return self.value


class _Check:
    def __init__(self, make_store: Callable[[], Awaitable[CursorStore]]) -> None:
        self._make = make_store
        self.made: list[CursorStore] = []
        self.where = "plain"
        self.step = ""

    # ----------------------------------------------------------------- plumbing

    async def store(self) -> CursorStore:
        store = await self._make()
        if not any(store is s for s in self.made):
            self.made.append(store)
        return store

    async def claiming(self) -> ClaimingCursorStore:
        store = await self.store()
        if not isinstance(store, ClaimingCursorStore):
            self.fail(f"make_store returned a {type(store).__name__}, not a ClaimingCursorStore as before")
        return store

    def fail(self, message: str) -> NoReturn:
        raise AssertionError(f"{self.where}: {self.step}: {message}")

    def expect(self, ok: bool, message: str) -> None:
        if not ok:
            self.fail(message)

    @contextlib.asynccontextmanager
    async def at(self, where: str, step: str) -> AsyncIterator[None]:
        """A step of the check: an error the store raises in it is reported as the step's failure."""
        self.where, self.step = where, step
        try:
            yield
        except AssertionError:
            raise
        except (RjetError, OSError, TimeoutError) as e:
            self.fail(f"unexpected {type(e).__name__}: {e}")

    async def claim(self, store: ClaimingCursorStore, name: str, owner: str, after: str | None = None) -> Claim:
        claim = await store.claim(name, owner=owner, after=after)
        self.expect(claim.owner == owner, f"a claim with owner={owner!r} has owner {claim.owner!r}")
        return claim

    async def conflict(self, op: Awaitable[object], owner: str, what: str) -> CursorConflict:
        """``op`` must raise :class:`rjet.CursorConflict` naming ``owner``."""
        try:
            await op
        except CursorConflict as e:
            self.expect(owner in str(e), f"{what} raised CursorConflict not naming the owner {owner!r}: {e}")
            return e
        except RjetError as e:
            self.fail(f"{what} raised {type(e).__name__}, not CursorConflict: {e}")
        self.fail(f"{what} raised nothing, not CursorConflict")

    async def write(self, claim: Claim, cursor: str) -> None:
        await claim.set_cursor(cursor)
        await claim.flush()

    async def close(self) -> None:
        made, self.made = self.made, []
        for store in made:
            close = getattr(store, "close", None)
            if close is not None:
                result = close()
                if inspect.isawaitable(result):
                    await result

    # ----------------------------------------------------------------- every store

    async def plain(self) -> None:
        name = f"{_PREFIX}.a"
        async with self.at("get/set/flush", "a name never set"):
            first = await self.store()
            got = await first.get_cursor(name)
            self.expect(got == "", f"get_cursor of a name never set returned {got!r}, not ''")
        async with self.at("get/set/flush", "set, flush, read back by a new store"):
            await first.set_cursor(name, "5")
            await first.set_cursor(name, "7")  # the last value set is the one kept
            for i, odd in enumerate(_ODD_NAMES):
                await first.set_cursor(odd, str(100 + i))
            await first.flush()
            await first.flush()  # a flush with nothing buffered is fine
            second = await self.store()
            got = await second.get_cursor(name)
            self.expect(got == "7", f"a new store read {got!r} for a flushed cursor, not '7'")
        async with self.at("get/set/flush", "names with dots, spaces, '/', '*', '>', non-ASCII, long ones"):
            for i, odd in enumerate(_ODD_NAMES):
                got = await second.get_cursor(odd)
                self.expect(got == str(100 + i), f"the name {odd!r} read back {got!r}, not '{100 + i}'")
        async with self.at("get/set/flush", "a cursor set back to ''"):
            await second.set_cursor(name, "")
            await second.flush()
            got = await (await self.store()).get_cursor(name)
            self.expect(got == "", f"a cursor set back to '' read back {got!r}")

    # ----------------------------------------------------------------- claims

    async def claims(self) -> None:
        me = runner_id()
        name = f"{_PREFIX}.claim.unknown"
        async with self.at("claims", "a claim of a name never written"):
            store = await self.claiming()
            claim = await self.claim(store, name, me)
            self.expect(claim.cursor == "", f"its cursor is {claim.cursor!r}, not ''")
            self.expect(not claim.done, f"its done is {claim.done!r}, not None")
            self.expect(claim.stream is None, f"its stream is {claim.stream!r}, not None")
        async with self.at("claims", "a claim just made is held"):
            self.expect(claim.lost is None, f"its lost is {claim.lost!r}")
            claim.check()
            waiting = asyncio.ensure_future(claim.wait_lost())
            await asyncio.sleep(0.05)
            self.expect(not waiting.done(), "its wait_lost returned")
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
            await claim.confirm()
            await claim.release()
        async with self.at("claims", "a claim without an owner"):
            anon = await store.claim(f"{_PREFIX}.claim.anonymous")
            self.expect(isinstance(anon.owner, str) and bool(anon.owner), f"its owner is {anon.owner!r}")
            await anon.release()
        name = f"{_PREFIX}.claim.written"
        async with self.at("claims", "set_cursor through a claim, release, read back by a new store"):
            claim = await self.claim(await self.claiming(), name, me)
            await claim.set_cursor("10")
            await claim.set_cursor("11")
            await claim.release()  # release flushes
            again = await self.claim(await self.claiming(), name, runner_id())
            self.expect(again.cursor == "11", f"a new store's claim read {again.cursor!r}, not '11'")
            await again.release()
            got = await (await self.store()).get_cursor(name)
            self.expect(got == "11", f"a new store's get_cursor read {got!r}, not '11'")

    async def stream_identity(self) -> None:
        name = f"{_PREFIX}.claim.stream"
        async with self.at("stream identity", "claim.stream is stored with the cursor"):
            claim = await self.claim(await self.claiming(), name, runner_id())
            claim.stream = _STREAM  # what run sets once the stream is open
            await claim.set_cursor("12")
            await claim.release()
            again = await self.claim(await self.claiming(), name, runner_id())
            self.expect(
                (again.cursor, again.stream) == ("12", _STREAM),
                f"the next claim read cursor {again.cursor!r} in stream {again.stream!r}, not '12' in {_STREAM!r}",
            )
        async with self.at("stream identity", "a claim keeps the stream it read for its own writes"):
            await again.set_cursor("13")
            await again.release()
            third = await self.claim(await self.claiming(), name, runner_id())
            self.expect(
                (third.cursor, third.stream) == ("13", _STREAM),
                f"the next claim read cursor {third.cursor!r} in stream {third.stream!r}, not '13' in {_STREAM!r}",
            )
            await third.release()

    async def exact_progress(self) -> None:
        name = f"{_PREFIX}.claim.progress"
        done = encode_done(20, [22, 23, 25])
        async with self.at("exact_progress", "a ProgressSource's snapshot comes back as cursor and done"):
            claim = await self.claim(await self.claiming(), name, runner_id())
            await claim.set_cursor(_Progress("20", done))
            await claim.release()
            again = await self.claim(await self.claiming(), name, runner_id())
            self.expect(
                (again.cursor, again.done) == ("20", done),
                f"the next claim read cursor {again.cursor!r} done {again.done!r}, not '20' done {done!r}",
            )
        async with self.at("exact_progress", "a plain cursor written after progress clears done"):
            await again.set_cursor("30")
            await again.release()
            third = await self.claim(await self.claiming(), name, runner_id())
            self.expect(
                third.cursor == "30" and not third.done,
                f"the next claim read cursor {third.cursor!r} done {third.done!r}, not '30' with no done",
            )
            await third.release()

    # ----------------------------------------------------------------- fencing

    async def fencing(self) -> None:
        name = f"{_PREFIX}.fence.write"
        a, b = runner_id(), runner_id()
        async with self.at("fencing", "a claim by another owner through another store"):
            first = await self.claim(await self.claiming(), name, a)
            await self.write(first, "1")
            second = await self.claim(await self.claiming(), name, b)
            self.expect(second.cursor == "1", f"the second claim read {second.cursor!r}, not '1'")
        async with self.at("fencing", "the first claim's write after another owner's claim"):
            await self.conflict(self.write(first, "2"), b, "set_cursor and flush")
        async with self.at("fencing", "the fenced claim knows it is lost"):
            self.expect(first.lost is not None, "its lost is None")
            try:
                await asyncio.wait_for(first.wait_lost(), _WAIT)
            except TimeoutError:
                self.fail(f"its wait_lost did not return within {_WAIT:g}s")
            with contextlib.suppress(RjetError):
                first.check()
                self.fail("its check() raised nothing")
        async with self.at("fencing", "a fenced claim writes no more"):
            await self.conflict(self.write(first, "4"), b, "set_cursor and flush again")
        async with self.at("fencing", "the newer claim writes on"):
            await self.write(second, "3")
        async with self.at("fencing", "release of a fenced claim"):
            await first.release()
            await second.release()
            got = await self.claim(await self.claiming(), name, runner_id())
            self.expect(got.cursor == "3", f"a new claim read {got.cursor!r}, not '3' (the newer claim's)")
            await got.release()

    async def confirm_fenced(self) -> None:
        name = f"{_PREFIX}.fence.confirm"
        a, b = runner_id(), runner_id()
        async with self.at("fencing", "confirm after another owner's claim"):
            first = await self.claim(await self.claiming(), name, a)
            second = await self.claim(await self.claiming(), name, b)
            await self.conflict(first.confirm(), b, "confirm")
            self.expect(first.lost is not None, "its lost is None after confirm raised")
            await first.release()
            await second.confirm()
            await second.release()

    async def same_owner_again(self) -> None:
        name = f"{_PREFIX}.fence.after"
        a, b = runner_id(), runner_id()
        async with self.at("fencing", "a runner's next run (after=owner) takes back its own record"):
            claim = await self.claim(await self.claiming(), name, a)
            await self.write(claim, "5")
            await claim.release()
            again = await self.claim(await self.claiming(), name, a, after=a)
            self.expect(again.cursor == "5", f"it read {again.cursor!r}, not '5'")
            await self.write(again, "6")
            await again.release()
        async with self.at("fencing", "after=owner when another owner claimed meanwhile"):
            other = await self.claim(await self.claiming(), name, b)
            store = await self.claiming()
            await self.conflict(store.claim(name, owner=a, after=a), b, f"claim(after={a!r})")
            await other.confirm()  # the other owner still holds it
            await self.write(other, "7")
            await other.release()

    async def ambiguous_write(self) -> None:
        name = f"{_PREFIX}.fence.ambiguous"
        a = runner_id()
        async with self.at("fencing", "a write by the same owner through another store is its own"):
            first_store = await self.claiming()
            first = await self.claim(first_store, name, a)
            await self.write(first, "8")
            # The same runner's write, applied though its answer never came back, stands for one
            # written through a second store with the same owner.
            applied = await self.claim(await self.claiming(), name, a)
            await self.write(applied, "9")
            await applied.release()
            again = await self.claim(first_store, name, a, after=a)
            self.expect(again.cursor == "9", f"the runner's next claim read {again.cursor!r}, not '9'")
            await self.write(again, "10")
            await again.release()
            await first.release()
            got = await self.claim(await self.claiming(), name, runner_id())
            self.expect(got.cursor == "10", f"a new claim read {got.cursor!r}, not '10'")
            await got.release()
