"""The daemon's garbage-collector set-up (cli.tune_gc): the start-up heap frozen out of every later
collection, and young collections at a higher threshold. Run in a fresh interpreter, since it
changes the collector of the whole process."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import gc, json
import cti_bridge.app  # what the daemon has imported by the time it starts its loop
from cti_bridge.cli import GC_THRESHOLDS, tune_gc
before = gc.get_freeze_count()
tune_gc()
print(json.dumps({"before": before, "frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects()),
                  "thresholds": list(gc.get_threshold()), "expected": list(GC_THRESHOLDS)}))
"""


def test_tune_gc_freezes_the_start_up_heap_and_raises_the_young_threshold() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True
    )
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["before"] == 0
    # Everything imported is out of the collector's walks from now on: many thousands of objects
    # frozen, next to none left to walk.
    assert seen["frozen"] > 50_000, seen
    assert seen["tracked"] < seen["frozen"] / 100, seen
    assert seen["thresholds"] == seen["expected"] and seen["expected"][0] > 700
