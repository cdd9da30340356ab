"""Plain-text layout for the views (``rjet status``, ``rjet group``): tables and lines that fit the
terminal's width (or ``$COLUMNS``, 80 in a pipe), never break a name, and end in no spaces.

A table's first column holds names (a consumer, a shard): a name too long for the width it can
have gets a line of its own, and its row's values go on the next line under their headers. Its
last columns may be *details* (who runs a shard, a note): when the whole table does not fit, each
row's details go on indented lines of their own below it, wrapped at spaces."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from rich.console import Console

__all__ = ["GAP", "table", "width", "wrap"]

GAP = 2
"""Spaces between columns."""
_DETAIL_INDENT = 4


def width() -> int:
    """The width to lay out for: the terminal's, or ``$COLUMNS``, or 80 (a pipe, a file)."""
    return max(40, Console().width)


def wrap(text: str, limit: int, *, indent: int = 0, hang: int = 4) -> list[str]:
    """``text`` in lines of at most ``limit`` columns, broken at spaces only (a word longer than the
    line keeps its own line whole), the first indented by ``indent``, the others by ``indent + hang``."""
    return textwrap.wrap(
        text,
        max(limit, 20),
        initial_indent=" " * indent,
        subsequent_indent=" " * (indent + hang),
        break_long_words=False,
        break_on_hyphens=False,
    ) or [""]


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    limit: int,
    *,
    right: Sequence[bool],
    details: int = 0,
) -> list[str]:
    """``rows`` under ``headers`` in at most ``limit`` columns (but for a word too long for any line).

    ``right``: which columns are right-justified. The last ``details`` columns are details: shown as
    columns when everything fits, else on lines of their own under each row (``header: value``, or
    the value alone under an empty header; an empty one or "-" not at all); a details column empty in
    every row is left out."""
    count = len(headers)
    first = count - details
    keep = [i for i in range(count) if i < first or any(row[i] for row in rows)]
    kept_headers, kept_rows = [headers[i] for i in keep], [[row[i] for i in keep] for row in rows]
    kept_right = [right[i] for i in keep]
    if len(keep) == first or max(map(len, _columns(kept_headers, kept_rows, kept_right))) <= limit:
        return _fit_names(kept_headers, kept_rows, kept_right, limit)
    below = [_details(headers, row, first, limit) for row in rows]
    return _fit_names(headers[:first], [row[:first] for row in rows], right[:first], limit, after=below)


def _details(headers: Sequence[str], row: Sequence[str], first: int, limit: int) -> list[str]:
    out: list[str] = []
    for header, value in zip(headers[first:], row[first:], strict=True):
        if value and value != "-":
            out += wrap(f"{header}: {value}" if header else value, limit, indent=_DETAIL_INDENT, hang=2)
    return out


def _widths(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[int]:
    return [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]


def _line(cells: Sequence[str], widths: Sequence[int], right: Sequence[bool]) -> str:
    parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)]
    return (" " * GAP).join(parts).rstrip()


def _columns(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> list[str]:
    widths = _widths(headers, rows)
    return [_line(headers, widths, right)] + [_line(row, widths, right) for row in rows]


def _fit_names(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    right: Sequence[bool],
    limit: int,
    *,
    after: Sequence[list[str]] | None = None,
) -> list[str]:
    """The table with the first column (names) as wide as it may be within ``limit``: a longer name
    on a line of its own, its values on the next."""
    widths = _widths(headers, rows)
    rest = sum(widths[1:]) + GAP * (len(widths) - 1)
    room = max(len(headers[0]), limit - rest)
    fitting = [len(r[0]) for r in rows if len(r[0]) <= room]
    widths[0] = max([len(headers[0]), *fitting])
    lines = [_line(headers, widths, right)]
    for i, row in enumerate(rows):
        if len(row[0]) > widths[0]:
            lines.append(row[0])
            lines.append(_line(["", *row[1:]], widths, right))
        else:
            lines.append(_line(row, widths, right))
        if after is not None:
            lines += after[i]
    return lines


def member_line(member: str, host: str, pid: int, state: str, age: str, ttl: str, shards: Sequence[str]) -> str:
    """An elastic member, as ``rjet status`` and ``rjet group describe`` both say it (``age``: since
    its lease was written; ``state``: live or stopped)."""
    runs = f"runs {', '.join(shards) or 'no shard'}"
    if state == "stopped":
        kept = f"its shards are kept for it until its lease expires (TTL {ttl})"
        return f"member {member} on {host} pid {pid}, stopped {age} ago: {kept}; {runs}"
    return f"member {member} on {host} pid {pid}, lease renewed {age} ago; {runs}"


def expired_line(group: str, namespace: str, expired: Sequence[tuple[str, str, int, str, str | None]]) -> str:
    """The expired leases of ``group``'s members ((member, host, pid, age, when the group's live
    members delete it: None when it has none)) in one line, and how to remove them."""
    who = ", ".join(f"{member} ({host} pid {pid}, {age} ago)" for member, host, pid, age, _ in expired)
    prune = f"rjet group prune {group} --namespace {namespace} --execute"
    when = [f"{member}'s {'now' if due == 'now' else 'in ' + due}" for member, _, _, _, due in expired if due]
    gone = f"expired: {who}: gone (killed, or stopped and not back), ignored by the group"
    if not when:
        return f"{gone}; {prune} removes their leases"
    return f"{gone}; its live members delete the leases ({', '.join(when)}; {prune}: at once)"
