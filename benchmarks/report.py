"""Turn a ``--benchmark-json`` file into the Markdown tables of RESULTS.md.

::

    pytest benchmarks --benchmark-only --benchmark-json=bench.json
    python benchmarks/report.py bench.json [more.json ...]   # several runs' benchmarks merged
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib.metadata import version
from typing import Any

from rjet.server import find_nats_server


def _machine() -> list[str]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    server = subprocess.run([find_nats_server(), "--version"], capture_output=True, text=True).stdout.strip()
    return [
        f"- CPU: {cpu}, `nproc` = {os.cpu_count()}",
        f"- Python {platform.python_version()} ({platform.python_implementation()}), {platform.system()}",
        f"- nats-py {version('nats-py')}, {server}, pytest-benchmark {version('pytest-benchmark')}",
    ]


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        value = f"{value:,.2f}"
    elif isinstance(value, int):
        value = f"{value:,}"
    return f"{value}{unit}"


def _met(value: Any) -> str:
    return {True: "yes", False: "**no**", None: "-"}[value]


def main(*paths: str) -> None:
    benchmarks: list[dict[str, Any]] = []
    for path in paths:
        with open(path) as f:
            benchmarks += json.load(f)["benchmarks"]
    by_name: dict[str, dict[str, Any]] = {b["name"]: b["extra_info"] for b in benchmarks}

    def info(name: str) -> dict[str, Any]:
        return by_name.get(name, {})

    rows: list[tuple[str, str, str, str, str, str]] = []

    def row(path: str, rjet: str, baseline: str, ratio: str, target: str, met: Any) -> None:
        rows.append((path, rjet, baseline, ratio, target, _met(met)))

    r = info("test_rjet_ordered_read")
    if r:
        row(
            "1. ordered read (events/s)",
            _fmt(r.get("events_per_s")),
            f"fetch(1000): {_fmt(info('test_baseline_natspy_fetch').get('events_per_s'))}",
            _fmt(r.get("ratio_vs_natspy_fetch"), "x"),
            ">= 5x (aim 8x)",
            r.get("met"),
        )
        row(
            "   ordered read vs ordered push (events/s)",
            _fmt(r.get("events_per_s")),
            f"ordered push cb: {_fmt(info('test_baseline_natspy_ordered_push').get('events_per_s'))}",
            _fmt(r.get("ratio_vs_natspy_ordered_push"), "x"),
            "-",
            None,
        )
    s, a, h = info("test_reject_shard"), info("test_accept_all"), info("test_reject_hashed")
    if s:
        paired = s.get("paired_accept_all_cpu_us_per_event")
        row(
            "2. shard scan, worker CPU (us per passed-over event)",
            _fmt(s.get("cpu_us_per_event"), " us"),
            f"decoded + handled, interleaved: {_fmt(paired, ' us')}"
            if paired
            else f"decoded + handled: {_fmt(a.get('cpu_us_per_event'), ' us')}",
            f"{_fmt(s.get('cpu_cost_vs_paired_accept_all' if paired else 'cpu_cost_vs_accept_all'))} of the cost"
            f" (vs the accept-all benchmark: {_fmt(s.get('cpu_cost_vs_accept_all'))})",
            "<= 4 us (the 1/4 share is retired)",
            s.get("met"),
        )
        row(
            "   shard scan, wall time incl. the co-located server",
            _fmt(s.get("us_per_event"), " us"),
            f"decoded + handled: {_fmt(a.get('us_per_event'), ' us')}",
            f"{_fmt(s.get('cost_vs_accept_all'))} of the cost",
            "-",
            None,
        )
    if h:
        row(
            "   passing over with a Python key_filter (us per event)",
            _fmt(h.get("us_per_event"), " us"),
            f"decoded + handled: {_fmt(a.get('us_per_event'), ' us')}",
            f"{_fmt(1 / h['ratio_vs_accept_all'] if h.get('ratio_vs_accept_all') else None)} of the cost",
            "-",
            None,
        )
    i = info("test_rjet_insert_many")
    if i:
        row(
            "3. insert_many (events/s)",
            _fmt(i.get("events_per_s")),
            f"publish_async: {_fmt(info('test_baseline_natspy_publish_async').get('events_per_s'))}",
            _fmt(i.get("ratio_vs_natspy_publish_async"), "x"),
            ">= 2x",
            i.get("met"),
        )
        row(
            "   insert_many vs gather(js.publish) (events/s)",
            _fmt(i.get("events_per_s")),
            f"gather, window 1000: {_fmt(info('test_baseline_natspy_gather_publish').get('events_per_s'))}",
            _fmt(i.get("ratio_vs_natspy_gather_publish"), "x"),
            "-",
            None,
        )
    c = info("test_set_cursor_jetstream")
    if c:
        row(
            "4a. buffered set_cursor (calls/s)",
            _fmt(c.get("calls_per_s")),
            f"MemCursorStore: {_fmt(info('test_set_cursor_mem').get('calls_per_s'))}",
            _fmt(c.get("ratio_vs_mem"), "x"),
            ">= 1M calls/s",
            c.get("met"),
        )
    f100 = info("test_flush_100_keys")
    if f100:
        puts = info("test_baseline_natspy_kv_put_100_sequential")
        row(
            "4b. flush() of 100 dirty cursors",
            f"{_fmt(f100.get('latency_us'), ' us')}: {_fmt(f100.get('messages_sent_per_flush'))} msgs sent,"
            f" {_fmt(f100.get('replies_per_flush'))} reply waited for",
            f"100 sequential kv.put: {_fmt(puts.get('latency_us'), ' us')};"
            f" one: {_fmt(info('test_baseline_natspy_kv_put').get('latency_us'), ' us')}",
            f"{_fmt(f100.get('vs_100_kv_puts'), 'x')} faster than 100 puts",
            "one round trip per batch",
            f100.get("met"),
        )
    j = info("test_run_jetstream_store")
    if j:
        row(
            "4c. run to head, JetStream cursor store (events/s)",
            _fmt(j.get("events_per_s")),
            f"MemCursorStore: {_fmt(info('test_run_mem_store').get('events_per_s'))}",
            _fmt(j.get("ratio_vs_mem_store"), "x"),
            ">= 0.9x",
            j.get("met"),
        )
    for kind, n, handler, goal in (("cpu", 2, "CPU-bound (50 us)", 1.7), ("io", 8, "I/O-bound (1 ms sleep)", 6)):
        ra, pa = (
            info(f"test_parallel_scaling[{kind}-read-all-n{n}]"),
            info(f"test_parallel_scaling[{kind}-partitioned-n{n}]"),
        )
        if ra or pa:
            row(
                f"5. Parallel, {handler} handler, N={n} vs N=1 (events/s)",
                f"read-all {_fmt(ra.get('events_per_s'))}; partitioned {_fmt(pa.get('events_per_s'))}",
                "N=1",
                f"{_fmt(ra.get('speedup_vs_n1'), 'x')}; partitioned {_fmt(pa.get('speedup_vs_n1'), 'x')}",
                f">= {goal}x",
                ra.get("met"),
            )
    m = info("test_worker_rss")
    if m:
        end = m.get(f"rss_mb_at_{m['events'] // 1000}k")
        row(
            f"6. worker RSS, 100k -> {m['events']:,} events",
            f"{_fmt(m.get('rss_mb_at_100k'))} -> {_fmt(end)} MB",
            "-",
            f"{_fmt(m.get('rss_growth_100k_to_end'))} growth",
            "<= 0.20",
            m.get("met"),
        )
    big = info("test_worker_rss_large_events")
    if big:
        row(
            f"6b. worker RSS, {big.get('events'):,} events of {big.get('event_kb')} KB, slow handler",
            f"peak {_fmt(big.get('rss_mb_peak'))} MB (start {_fmt(big.get('rss_mb_at_start'))})",
            "-",
            "-",
            f"peak <= start x 1.25 + max_buffered_bytes ({_fmt(big.get('max_buffered_mb'))} MB)",
            big.get("met"),
        )
    d = info("test_rjet_full_decode")
    if d:
        row(
            "decode (us/event)",
            _fmt(d.get("us_per_event"), " us"),
            f"Msg.metadata: {_fmt(info('test_baseline_natspy_metadata').get('us_per_event'), ' us')}",
            _fmt(d.get("ratio_vs_natspy_metadata"), "x"),
            "-",
            None,
        )

    print("\n".join(_machine()))
    print()
    print("| path | rjet | baseline | ratio | target | met? |")
    print("|---|---|---|---|---|---|")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")
    curve = [b["extra_info"] for b in benchmarks if b["name"].startswith("test_parallel_scaling[")]
    if curve:
        print()
        print("| Parallel: handler | layout | N | events/s | speed-up vs N=1 | efficiency (speed-up / N) |")
        print("|---|---|---|---|---|---|")
        for c in sorted(curve, key=lambda c: (c["handler"], c["layout"], c["workers"])):
            print(
                f"| {c['handler']} | {c['layout']} | {c['workers']} | {_fmt(c['events_per_s'])}"
                f" | {_fmt(c.get('speedup_vs_n1'), 'x')} | {_fmt(c.get('efficiency'))} |"
            )
    print()
    print("| benchmark | group | min | median | rounds | extra_info |")
    print("|---|---|---|---|---|---|")
    for b in benchmarks:
        st = b["stats"]
        extra = ", ".join(f"{k}={v}" for k, v in b["extra_info"].items() if k not in ("target", "met"))
        print(
            f"| {b['name']} | {b['group']} | {st['min'] * 1e3:,.2f} ms | {st['median'] * 1e3:,.2f} ms"
            f" | {st['rounds']} | {extra} |"
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
