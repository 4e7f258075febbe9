"""Where the daemon's time goes, from a py-spy ``raw`` profile (collapsed stacks with counts).

bench_e2e.py ``--profile DIR`` records the daemon with ``py-spy record --threads --nonblocking
--format raw`` (only samples of threads that are running, so the shares are shares of CPU). This
prints: samples per thread, a breakdown by stage of the event's path (the first rule below that
matches a stack wins, so the more specific stage is tried first), the functions with the most self
time, and the cti_bridge functions with the most inclusive time.

    .venv/bin/python bench/profile_report.py bench/results/profile-sqlite.txt [--cpu-ms-per-event X]
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

# (stage, substrings of a stack: any one matches). Order matters: the first stage that matches wins.
DB_STAGES: list[tuple[str, tuple[str, ...]]] = [
    (
        "db: BEGIN IMMEDIATE / COMMIT",
        ("Session.commit", "_on_begin", "Connection.commit", "_connection_for_bind", "Transaction.commit"),
    ),
    ("db: pipeline ingest (insert event + deliveries)", ("ingest_sync", "_ingest_batch")),
    ("db: claim (select due, update lease, select rows)", ("claim_due",)),
    (
        "db: completion (update delivery, count + insert attempt)",
        ("_finish.<locals>.write", "complete (", "complete_many"),
    ),
    ("db: next_due_at", ("next_due_at",)),
    ("db: token store", ("tokens.py",)),
    ("db: session open/close", ("Session.close", "Session.__exit__", "Session.__init__", "Database.session")),
]
LOOP_STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("ws: parse the event (json, normalise)", ("parse_notification", "normalise_fields")),
    ("ws: websocket protocol (websockets)", ("websockets/",)),
    ("render (mapping -> request)", ("CompiledMapping.render", "render.py")),
    ("token (TokenManager.get)", ("TokenManager",)),
    ("outbound guard (check_url)", ("check_url",)),
    ("worker: completion prep (attempt record, masking)", ("DeliveryWorker._finish",)),
    ("http: httpx request/response", ("httpx/", "httpcore/", "httpx_aiohttp/")),
    ("http: the CRM client (http1.py, httptools)", ("http1.py", "httptools/", "crm_client.py")),
    ("http: aiohttp client", ("aiohttp/",)),
    ("worker: claim loop and task start", ("DeliveryWorker._loop", "DeliveryWorker._process")),
    ("pipeline/source glue", ("Pipeline.ingest", "XelionSource", "on_event")),
    ("thread hand-off (run_in_executor, futures)", ("run_in_executor", "futures/", "_chain_future")),
    ("admin API", ("uvicorn/", "starlette/", "fastapi/")),
    ("logging", ("logging/",)),
    ("asyncio event loop", ("asyncio/",)),
]

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*):\d+\)$")


def _parse(path: Path) -> list[tuple[str, list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        line = line.rstrip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread = frames[0]
        # "thread (1234): cti-db_0" -> "cti-db_0"; the main thread has no name after the colon.
        name = thread.split(":", 1)[1].strip() if ":" in thread else thread
        stacks.append((name or "main", frames[1:], int(count)))
    return stacks


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    file = m.group("file")
    for marker in ("site-packages/", "lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{m.group('func')} ({file})"


def _stage(thread: str, frames: list[str]) -> str:
    text = ";".join(frames)
    # A quick SQLite unit of work runs in the loop's thread (store/db.py): it is database time too.
    in_db = thread.startswith("cti-db") or "Database.run_sync" in text or "Database._run_inline" in text
    rules = DB_STAGES if in_db else LOOP_STAGES
    for name, needles in rules:
        if any(n in text for n in needles):
            return name
    return ("db: other" if in_db else "other") + f" [{thread}]"


def summarise(path: Path, top: int = 20, cpu_ms_per_event: float | None = None) -> str:
    stacks = _parse(path)
    total = sum(c for _, _, c in stacks) or 1
    by_thread: collections.Counter[str] = collections.Counter()
    by_stage: collections.Counter[str] = collections.Counter()
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for thread, frames, count in stacks:
        by_thread[re.sub(r"_\d+$", "", thread)] += count
        by_stage[_stage(thread, frames)] += count
        if frames:
            self_time[_short(frames[-1])] += count
        for frame in {f for f in frames if "cti_bridge/" in f}:
            inclusive[_short(frame)] += count

    def pct(n: int) -> str:
        share = 100.0 * n / total
        ms = f"  {cpu_ms_per_event * n / total:6.3f} ms/event" if cpu_ms_per_event else ""
        return f"{share:5.1f} %{ms}"

    out = [f"{total} samples (running threads only)", "by thread:"]
    out += [f"  {pct(n)}  {name}" for name, n in by_thread.most_common()]
    out.append("by stage:")
    out += [f"  {pct(n)}  {name}" for name, n in by_stage.most_common()]
    out.append(f"top {top} functions by self time:")
    out += [f"  {pct(n)}  {name}" for name, n in self_time.most_common(top)]
    out.append(f"top {top} cti_bridge functions by inclusive time:")
    out += [f"  {pct(n)}  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--cpu-ms-per-event", type=float, default=None)
    args = parser.parse_args()
    print(summarise(args.profile, args.top, args.cpu_ms_per_event))


if __name__ == "__main__":
    main()
