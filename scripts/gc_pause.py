"""Full garbage-collection pause of a server-sized process, by number of idle sessions.

Imports what the server imports, optionally freezes those start-up objects as ``rnnserve serve``
does, then times ``gc.collect()`` (median of seven) with 0, 10,000 and 100,000 sessions in a
``SessionStore``. Run both ways in turns to compare (docs/PERFORMANCE.md):

python scripts/gc_pause.py --freeze
python scripts/gc_pause.py
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import service.server  # noqa: F401  (everything the server holds after start-up)
from service.gc_pauses import freeze_start_up_objects
from service.session_store import SessionStore


def full_collection_ms(repeats: int = 7) -> float:
    pauses = []
    for _ in range(repeats):
        started = time.perf_counter()
        gc.collect()
        pauses.append(time.perf_counter() - started)
    return 1e3 * statistics.median(pauses)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--freeze", action="store_true", help="freeze start-up objects first")
    parser.add_argument("--sessions", type=int, nargs="+", default=[0, 10_000, 100_000])
    args = parser.parse_args()
    if args.freeze:
        freeze_start_up_objects()
    else:
        gc.collect()
    store = SessionStore(state_count=2, layers=1, hidden=32, max_sessions=max(args.sessions))
    print("| sessions | tracked objects | full collection ms |\n|---|---|---|")
    for sessions in sorted(args.sessions):
        while len(store) < sessions:
            store.create()
        pause_ms = full_collection_ms()
        print(f"| {sessions:,} | {len(gc.get_objects()):,} | {pause_ms:.1f} |")


if __name__ == "__main__":
    main()
