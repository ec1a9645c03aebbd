"""Progress messages for long single steps (building or loading a model) of the command line.

A model build is one call that can take minutes on a CPU and reports nothing; :func:`heartbeat` prints
a line when it starts, an elapsed-time line every few seconds while it runs (from a background
thread), and the total when it ends.
"""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager


@contextmanager
def heartbeat(what: str, *, every_s: float = 10.0, enabled: bool = True, stream=None):
    """``with heartbeat("building the model"): ...`` -> start line, "still ..." lines, "done in" line."""
    if not enabled:
        yield
        return
    stream = stream or sys.stdout
    print(f"  {what} ...", file=stream, flush=True)
    stop = threading.Event()
    start = time.perf_counter()

    def tick():
        while not stop.wait(every_s):
            print(f"  ... still {what} ({time.perf_counter() - start:.0f} s)", file=stream, flush=True)

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    print(f"  {what}: done in {time.perf_counter() - start:.1f} s", file=stream, flush=True)
