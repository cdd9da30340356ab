"""``rjet group``: a Parallel group's shards, members, cursors and lag in one view; reset or delete
them at once (what ``kafka-consumer-groups`` does for Kafka)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import click
import nats.js.errors
from rich.table import Table

import rjet
from rjet._nats.denials import guard_api, guard_kv
from rjet._progress import decode_done
from rjet._tool_write import (
    Build,
    Refused,
    StreamNow,
    check_position,
    check_stream,
    read_record,
    stream_now,
    tool_owner,
    write_record,
)
from rjet.cli._common import CliError, Connection, age, connection_options, run, stdout_console
from rjet.cursors import CursorRecord, kv_keys
from rjet.parallel import shard_name
from rjet.parallel._elastic import Member, group_names, members
from rjet.parallel._keys import DEFAULT_TTL, decode_record, generation_key, is_group_record, parse_shard_cursor
from rjet.parallel._reshard import heartbeats

if TYPE_CHECKING:
    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue

_BUCKET_PREFIX: Final = "rjet_cursors_"
_TTL: Final = DEFAULT_TTL  # for heartbeats and leases that do not carry their own


@dataclasses.dataclass(frozen=True, slots=True)
class Shard:
    """One shard cursor of a group."""

    name: str
    m: int  # 1-based, as in the name
    n: int
    cursor: int
    done_above: int  # events a concurrent consumer recorded as done above the cursor
    lag_events: int | None  # stream's last sequence - cursor (an upper bound on a partitioned stream)
    running_on: tuple[str, ...]  # fresh heartbeats: "member M (host pid P)" or "host pid P"


@dataclasses.dataclass(frozen=True, slots=True)
class Group:
    """What ``describe`` shows: a group's current shards, its old generations, its members."""

    name: str
    namespace: str
    n: int | None  # the current shard count (its generation record), None when unknown
    shards: tuple[Shard, ...]
    old_generations: tuple[int, ...]
    members: tuple[Member, ...]

    @property
    def lag_events(self) -> int | None:
        lags = [s.lag_events for s in self.shards if s.lag_events is not None]
        return sum(lags) if lags else None

    @property
    def running(self) -> bool:
        return any(s.running_on for s in self.shards)


@click.group()
def group() -> None:
    """List, describe, reset and delete the cursors of Parallel groups (sharded consumers).

    \b
        rjet group list --namespace shop
        rjet group describe billing --namespace shop --stream orders
        rjet group reset billing --namespace shop --stream orders --to-datetime 2026-12-01T08:00:00Z
        rjet group reset billing --namespace shop --stream orders --shift-by -1000 --execute
        rjet group delete billing --namespace shop --execute
    """


_namespace = click.option(
    "--namespace", required=True, metavar="NS", help="Cursor namespace (KV bucket rjet_cursors_NS)."
)
_json = click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")


@group.command("list")
@_namespace
@_json
@connection_options
def list_groups(conn: Connection, namespace: str, as_json: bool) -> None:
    """The groups with cursors in NAMESPACE: shard count, generations, members, whether they run."""
    found = run(_list(conn, namespace))
    if as_json:
        for g in found:
            click.echo(json.dumps(_group_json(g)))
        return
    if not found:
        click.echo(f"no Parallel group in namespace {namespace!r}")
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("group", "n", "old n", "members", "running"):
        table.add_column(col)
    for g in found:
        live = [m.member for m in g.members if m.live]
        table.add_row(
            g.name, str(g.n or "?"), ",".join(map(str, g.old_generations)) or "-", ", ".join(live) or "-",
            "yes" if g.running else "no",
        )  # fmt: skip
    stdout_console().print(table)


@group.command("describe")
@click.argument("name")
@_namespace
@click.option("--stream", required=True, metavar="STREAM", help="The stream the group reads (for the lag).")
@_json
@connection_options
def describe_group(conn: Connection, name: str, namespace: str, stream: str, as_json: bool) -> None:
    """Group NAME's shards (cursor, lag, who runs them), its total lag, and its members."""
    g = run(_describe(conn, name, namespace, stream))
    if as_json:
        click.echo(json.dumps(_group_json(g)))
        return
    console = stdout_console()
    total = "?" if g.lag_events is None else f"{g.lag_events:,}"
    console.print(
        f"group [bold]{g.name}[/] in {g.namespace}: n={g.n or '?'}, lag {total} event(s)"
        + (f"; old generations n={','.join(map(str, g.old_generations))}" if g.old_generations else ""),
        highlight=False,
        soft_wrap=True,
    )
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col, justify in [("shard", "left"), ("cursor", "right"), ("done above", "right"), ("lag", "right"),
                         ("running on", "left")]:  # fmt: skip
        table.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for s in g.shards:
        lag = "?" if s.lag_events is None else f"{s.lag_events:,}"
        table.add_row(s.name, str(s.cursor), str(s.done_above or "-"), lag, ", ".join(s.running_on) or "-")
    console.print(table)
    for m in g.members:
        state = "live" if m.live else "expired"
        console.print(
            f"member {m.member} on {m.host} pid {m.pid}: lease renewed {age(m.seen_ago)} ago ({state})",
            highlight=False,
            soft_wrap=True,
        )


@group.command("reset")
@click.argument("name")
@_namespace
@click.option("--stream", required=True, metavar="STREAM", help="The stream the group reads.")
@click.option("--to-earliest", is_flag=True, help="Before the stream's first retained event.")
@click.option("--to-latest", is_flag=True, help="After every event the stream holds now.")
@click.option("--to-seq", type=click.IntRange(min=1), metavar="SEQ", help="The next event handled is SEQ.")
@click.option("--to-datetime", metavar="ISO", help="The next event handled is the first stored at or after ISO.")
@click.option("--shift-by", type=int, metavar="N", help="Move every cursor by N events (negative: handle again).")
@click.option(
    "--skip-removed",
    is_flag=True,
    help="Accept a position before the stream's first retained event: the cursors are set just before that"
    " event and the events removed in between are skipped.",
)
@click.option("--execute", is_flag=True, help="Write the new cursors (without it: show them, a dry run).")
@_json
@connection_options
def reset_group(
    conn: Connection,
    name: str,
    namespace: str,
    stream: str,
    to_earliest: bool,
    to_latest: bool,
    to_seq: int | None,
    to_datetime: str | None,
    shift_by: int | None,
    skip_removed: bool,
    execute: bool,
    as_json: bool,
) -> None:
    """Move every shard cursor of group NAME at once; a dry run unless --execute.

    Refused while any shard of the group runs (stop it everywhere first). Exact progress above the
    old cursors is dropped. Give exactly one of the --to-* / --shift-by options. Each new record
    names STREAM as it is now (a stream deleted and created again later raises
    rjet.StreamRecreated). Refused: a position past the stream's last sequence, one before its first
    retained event (unless --skip-removed; --shift-by stops there when the cursor was not before it
    already), shard cursors recorded in another stream, and --shift-by of cursors recorded in an
    earlier stream of the same name.
    """
    given = (to_earliest, to_latest, to_seq is not None, to_datetime is not None, shift_by is not None)
    if sum(given) != 1:
        raise click.UsageError("give exactly one of --to-earliest, --to-latest, --to-seq, --to-datetime, --shift-by")
    when = None
    if to_datetime is not None:
        try:
            when = datetime.fromisoformat(to_datetime.replace("Z", "+00:00"))
        except ValueError:
            raise click.UsageError(f"--to-datetime {to_datetime!r}: not an ISO date and time") from None
        if when.tzinfo is None:
            raise click.UsageError(f"--to-datetime {to_datetime!r}: give a time zone (Z or +01:00)")
    target = _Target(to_earliest, to_latest, to_seq, when, shift_by)
    plan = run(_reset(conn, name, namespace, stream, target, execute, skip_removed))
    if as_json:
        moves = [{"shard": shard, "old": old, "new": new} for shard, old, new in plan]
        click.echo(json.dumps({"group": name, "executed": execute, "cursors": moves}))
        return
    for shard, old, new in plan:
        click.echo(f"{shard}: {old} -> {new}")
    click.echo(f"{len(plan)} cursor(s) " + ("moved" if execute else "would move (a dry run: add --execute)"))


@group.command("delete")
@click.argument("name")
@_namespace
@click.option("--execute", is_flag=True, help="Delete (without it: list what would go, a dry run).")
@connection_options
def delete_group(conn: Connection, name: str, namespace: str, execute: bool) -> None:
    """Delete group NAME's cursors (every shard count), generation record, heartbeats and member leases.

    Refused while any shard of the group runs. The next run of the group starts from the beginning.
    """
    keys = run(_delete(conn, name, namespace, execute))
    for key in keys:
        click.echo(key)
    click.echo(f"{len(keys)} key(s) " + ("deleted" if execute else "would be deleted (a dry run: add --execute)"))


# ----------------------------------------------------------------- reading a group


async def _bucket(js: JetStreamContext, namespace: str) -> KeyValue:
    bucket = _BUCKET_PREFIX + namespace
    try:
        return await guard_api(js, "KV_" + bucket, js.key_value(bucket))
    except nats.js.errors.BucketNotFoundError:
        raise CliError(f"cursor namespace {namespace!r} not found (no KV bucket {bucket!r})") from None


def _shard_keys(keys: list[str]) -> dict[str, dict[int, dict[int, str]]]:
    """group name -> n -> m (0-based) -> KV key, for every shard cursor among ``keys``."""
    out: dict[str, dict[int, dict[int, str]]] = {}
    for key in keys:
        if (shard := parse_shard_cursor(key)) is not None:
            name, m, n = shard
            out.setdefault(name, {}).setdefault(n, {})[m] = key
    return out


async def _current_n(kv: KeyValue, name: str, generations: dict[int, dict[int, str]]) -> int | None:
    try:
        entry = await guard_kv(kv, kv.get(generation_key(name)))
        return int((decode_record(entry.value) or {})["n"])
    except (nats.js.errors.KeyNotFoundError, ValueError, KeyError, TypeError):
        return max(generations) if len(generations) == 1 else None


async def _read_group(kv: KeyValue, keys: list[str], name: str, namespace: str, last: int | None) -> Group:
    generations = _shard_keys(keys).get(name, {})
    if not generations and name not in group_names(keys):
        raise CliError(
            f"no Parallel group {name!r} in namespace {namespace!r} (`rjet group list --namespace {namespace}`)"
        )
    n = await _current_n(kv, name, generations)
    beats = await heartbeats(kv, keys)
    shards = []
    for m in range(n or 0):
        shard = shard_name(name, m, n or 1)
        key = generations.get(n or 0, {}).get(m)
        record = CursorRecord()
        if key is not None:
            with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                record = CursorRecord.decode((await guard_kv(kv, kv.get(key))).value)
        cursor = int(record.cursor) if record.cursor.isdigit() else 0
        try:
            done = len(decode_done(cursor, record.done or ""))
        except ValueError:
            done = 0
        running = tuple(
            (f"member {b.member} ({b.host} pid {b.pid})" if b.member else f"{b.host} pid {b.pid}")
            for b in beats.get(shard, ()) if b.age < (b.ttl or _TTL)
        )  # fmt: skip
        lag = None if last is None else max(0, last - cursor)
        shards.append(Shard(shard, m + 1, n or 0, cursor, done, lag, running))
    old = tuple(sorted(g for g in generations if g != n))
    return Group(name, namespace, n, tuple(shards), old, tuple(await members(kv, name, _TTL)))


async def _keys(kv: KeyValue) -> list[str]:
    """The bucket's keys that hold a value (a deleted or purged key keeps a marker, which lists it)."""
    keys = await kv_keys(kv)

    async def alive(key: str) -> bool:
        try:
            await guard_kv(kv, kv.get(key))
        except nats.js.errors.KeyNotFoundError:
            return False
        return True

    found = await asyncio.gather(*(alive(k) for k in keys))
    return [k for k, ok in zip(keys, found, strict=True) if ok]


async def _list(conn: Connection, namespace: str) -> list[Group]:
    async with conn.connect() as nc:
        kv = await _bucket(nc.jetstream(), namespace)
        keys = await _keys(kv)
        names = sorted(set(_shard_keys(keys)) | group_names(keys))
        return [await _read_group(kv, keys, n, namespace, None) for n in names]


async def _describe(conn: Connection, name: str, namespace: str, stream: str) -> Group:
    async with conn.connect() as nc:
        js = nc.jetstream()
        info = await rjet.Stream(js, stream).info()
        kv = await _bucket(js, namespace)
        return await _read_group(kv, await _keys(kv), name, namespace, info.state.last_seq)


# ----------------------------------------------------------------- changing a group


@dataclasses.dataclass(frozen=True, slots=True)
class _Target:
    earliest: bool
    latest: bool
    seq: int | None
    when: datetime | None
    shift: int | None


def _refuse_if_running(g: Group, what: str) -> None:
    if g.running:
        where = "; ".join(f"{s.name} on {', '.join(s.running_on)}" for s in g.shards if s.running_on)
        raise CliError(f"group {g.name!r} is running ({where}): stop it everywhere before you {what} it")


async def _first_at(js: JetStreamContext, stream: str, when: datetime, first: int, last: int) -> int:
    """The first stream sequence stored at or after ``when`` (last + 1 when none): a binary search."""
    lo, hi = first, last + 1
    while lo < hi:
        mid = (lo + hi) // 2
        try:
            msg = await guard_api(js, stream, js.get_msg(stream, seq=mid, subject=">", next=True))
        except nats.js.errors.NotFoundError:
            hi = mid
            continue
        seq = msg.seq or mid
        if msg.time is not None and msg.time >= when:
            hi = mid
        else:
            lo = seq + 1
    return lo


async def _reset(
    conn: Connection, name: str, namespace: str, stream: str, target: _Target, execute: bool, skip_removed: bool
) -> list[tuple[str, int, int]]:
    async with conn.connect() as nc:
        js = nc.jetstream()
        now = await stream_now(js, stream, f"group {name!r} not reset")
        kv = await _bucket(js, namespace)
        bucket = _BUCKET_PREFIX + namespace
        g = await _read_group(kv, await _keys(kv), name, namespace, now.last_seq)
        if not g.shards:
            raise CliError(f"group {name!r}: no current shard count recorded; nothing to reset")
        if execute:
            _refuse_if_running(g, "reset")
        start = None
        if target.earliest:
            start = now.first_seq
        elif target.seq is not None:
            start = target.seq
        elif target.when is not None:
            start = await _first_at(js, stream, target.when, now.first_seq, now.last_seq)
        over = f"`rjet group delete {name} --namespace {namespace} --execute`, then run it on {now.name!r}"
        plan, notes = [], []
        for s in g.shards:
            record, _ = await read_record(kv, s.name, bucket)
            recreated = check_stream(s.name, record.stream if record else None, now, named=True, over=over)
            note = ""
            if target.latest:
                new = now.last_seq
            elif target.shift is not None:
                if recreated:
                    raise Refused(
                        f"cursor {s.name!r} was recorded in {record.stream if record else None}, an earlier stream"
                        f" {now.name!r} (deleted and created again since): shifting it means nothing in"
                        f" {now.identity}; nothing written (give a position: --to-earliest, --to-seq, ...)"
                    )
                new = min(max(0, s.cursor + target.shift), now.last_seq)
                if new < now.first_seq - 1 <= s.cursor:
                    new = now.first_seq - 1  # replaying: stops at the first retained event, nothing skipped
                new, note = check_position(s.name, new, now, skip_removed=skip_removed, flag="--skip-removed")
            else:
                assert start is not None
                new, note = check_position(s.name, max(0, start - 1), now, skip_removed=skip_removed,
                                           flag="--skip-removed")  # fmt: skip
            notes += [n for n in (recreated, note) if n and n not in notes]
            plan.append((s.name, s.cursor, new))
        for n in notes:
            click.echo(f"rjet: {n}", err=True)
        if execute:
            owner = tool_owner("rjet group reset")
            for shard, _, new in plan:
                await write_record(kv, bucket, shard, _reset_to(shard, new, now, owner, over))
        return plan


def _reset_to(shard: str, new: int, now: StreamNow, owner: str, over: str) -> Build:
    """What ``group reset`` writes over shard ``shard``'s record (its stream checked again as written)."""

    async def build(old: CursorRecord | None) -> CursorRecord:
        check_stream(shard, old.stream if old else None, now, named=True, over=over)
        return CursorRecord(str(new) if new else "", now.identity, owner)

    return build


async def _delete(conn: Connection, name: str, namespace: str, execute: bool) -> list[str]:
    async with conn.connect() as nc:
        kv = await _bucket(nc.jetstream(), namespace)
        keys = await _keys(kv)
        g = await _read_group(kv, keys, name, namespace, None)
        if execute:
            _refuse_if_running(g, "delete")
        mine = [k for gen in _shard_keys(keys).get(name, {}).values() for k in gen.values()]
        meta = [k for k in keys if is_group_record(k, name)]
        doomed = sorted(mine) + sorted(meta)
        if execute:
            await asyncio.gather(*(guard_kv(kv, kv.purge(k), k) for k in doomed))
        return doomed


def _group_json(g: Group) -> dict[str, Any]:
    now = time.time()
    return {
        "group": g.name,
        "namespace": g.namespace,
        "n": g.n,
        "lag_events": g.lag_events,
        "running": g.running,
        "old_generations": list(g.old_generations),
        "shards": [dataclasses.asdict(s) for s in g.shards],
        "members": [{**dataclasses.asdict(m), "at": now} for m in g.members],
    }
