"""What SQLite work in a thread of its own gets while the event loop's thread is busy (issue 7).

The daemon runs SQLite's short transactions in the loop's thread (store/db.py). Moving them to a
thread would put SQLite's C code on the other core, but the sqlite3 module lets go of the GIL around
every statement step and takes it back after: while the other thread keeps the GIL busy, each take
waits up to the switch interval (5 ms). This measures it with a stand-in for the loop (a Python
loop counting) and a thread writing batches of 128 rows, each batch one transaction:

- ``none``: the counting loop alone; ``dbonly``: the writer alone (multi-row INSERTs);
- ``multi``: both, the writer with one multi-row INSERT per batch (three steps: BEGIN, the
  INSERT, COMMIT);
- ``many``: both, the writer with ``executemany`` (a step per row).

    .venv/bin/python bench/gil_handoff.py

Prints the counting loop's iterations per second and the rows the writer got per second.
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

N = 128  # rows per batch
SECONDS = 2.0


def run(mode: str, folder: Path) -> tuple[float, float]:
    conn = sqlite3.connect(folder / f"{mode}.db", isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE t (id TEXT PRIMARY KEY, a INT, b TEXT, c TEXT, d INT)")
    conn.execute("CREATE INDEX ix_a ON t (a)")
    conn.execute("CREATE INDEX ix_b ON t (b)")
    multi = "INSERT INTO t VALUES " + ",".join(["(?, ?, ?, ?, ?)"] * N)
    stop = threading.Event()
    rows = 0

    def writer() -> None:
        nonlocal rows
        k = 0
        while not stop.is_set():
            batch = [(f"{k + i:032x}", k + i, "x" * 40, "y" * 200, i) for i in range(N)]
            k += N
            conn.execute("BEGIN IMMEDIATE")
            if mode == "many":
                conn.executemany("INSERT INTO t VALUES (?, ?, ?, ?, ?)", batch)
            else:
                conn.execute(multi, [v for row in batch for v in row])
            conn.execute("COMMIT")
            rows += N

    def count(seconds: float) -> int:
        n = 0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            for _ in range(1000):
                n += 1
        return n

    thread = threading.Thread(target=writer) if mode != "none" else None
    if thread is not None:
        thread.start()
    if mode == "dbonly":
        time.sleep(SECONDS)
        counted = 0
    else:
        counted = count(SECONDS)
    stop.set()
    if thread is not None:
        thread.join()
    conn.close()
    return counted / SECONDS, rows / SECONDS


def main() -> int:
    print(f"switch interval {sys.getswitchinterval() * 1000:.1f} ms, {N} rows per transaction")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("none", "dbonly", "multi", "many"):
            loop_rate, row_rate = run(mode, Path(tmp))
            print(f"{mode:7s} loop {loop_rate / 1e6:6.2f} M iterations/s   writer {row_rate:9,.0f} rows/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
