"""SDK benchmark: what reporting costs the application's own thread.

`run.progress()` validates nothing and sends nothing on the caller's thread: it numbers
the event, encodes it and queues it under one lock (the sender thread does the rest).
Baseline in the same run: `json.dumps` of the same event alone, the least any reporter
that speaks JSON must pay. Nothing listens on the client's URL, so no send competes for
the GIL and the figure is the application-side cost alone.

    .venv/bin/python bench/sdk.py [--calls 100000]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from monitor.client import Client

TARGET = 3.0
"""progress() may cost at most this many times a bare json.dumps of its event."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    logging.getLogger("execwatch.client").setLevel(logging.ERROR)
    client = Client("http://127.0.0.1:9", max_buffer=args.calls * args.rounds + 10)
    sdk, bare = [], []
    with client.track("bench", check_breaker=False) as run:
        event = {"type": "heartbeat", "execution_id": run.execution_id, "progress": 1,
                 "ts": time.time(), "seq": 1}  # fmt: skip
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for i in range(args.calls):
                run.progress(i)
            sdk.append((time.perf_counter() - t0) / args.calls)
            t0 = time.perf_counter()
            for _ in range(args.calls):
                json.dumps(event, separators=(",", ":")).encode()
            bare.append((time.perf_counter() - t0) / args.calls)
    client.close(0)
    per, base = min(sdk), min(bare)
    verdict = "PASS" if per / base <= TARGET else "FAIL"
    print(f"run.progress(): {per * 1e6:.2f} us per call on the application's thread")
    print(f"json.dumps of the same event alone: {base * 1e6:.2f} us")
    print(f"ratio {per / base:.2f}x   target <= {TARGET:.1f}x  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
