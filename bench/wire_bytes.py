"""Bytes on the wire to the analytics backend for 10,000 events, plain JSON and gzip.

    python -m bench.wire_bytes [--events N] [--out FILE]

The events are realistic: the three kinds in Rubrix's proportions of the bench's request
mix (two bulk, two logins, one error per five), browser and SDK user-agents, the server's
six platform keys in every context. They are packed into `/v1/batch` bodies exactly as a
worker packs them (`tasks.segment.pack_batches`), then measured as sent before (plain) and
now (gzip at `GZIP_LEVEL`). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

from telemetry_core import message
from telemetry_core.contract import (LOG_RECORDS_REQUESTED, SERVER_ERROR_FOUND, USER_INFO_REQUESTED,
                                   checked_wire_event, new_message_id_prefix, timestamp_us)
from telemetry_core.platform_info import platform_info
from tasks.segment import GZIP_LEVEL, _batch_body, pack_batches, segment_message

USER_AGENTS = [
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Safari/605.1.15",
    "python-requests/2.31.0",
    "rubrix-client/0.18.0 (python 3.8.13)",
]
LANGUAGES = ["en-US,en;q=0.9", "es-ES,es;q=0.9,en;q=0.8", "de"]
TASKS = ["TextClassification", "TokenClassification", "Text2Text"]
ANONYMOUS_ID = "3c4f2a61-0d5e-4b1a-9f57-2e8d6c1b7a90"


def realistic_events(count: int) -> list[dict]:
    raw = []
    for n in range(count):
        agent, language = USER_AGENTS[n % len(USER_AGENTS)], LANGUAGES[n % len(LANGUAGES)]
        kind = n % 5
        if kind in (0, 2):
            raw.append((USER_INFO_REQUESTED, timestamp_us(), n % 7 != 0, agent, language))
        elif kind in (1, 3):
            raw.append((LOG_RECORDS_REQUESTED, timestamp_us(), TASKS[n % 3], (n * 37) % 5000))
        else:
            raw.append((SERVER_ERROR_FOUND, timestamp_us(), "rubrix.api.errors::EntityNotFoundError", agent, language))
    prefix = new_message_id_prefix()
    wire = [checked_wire_event(event, sequence) for sequence, event in enumerate(raw)]
    batch = message.read([], message.encode(platform_info(), prefix, wire))
    return [segment_message(event, batch.platform or platform_info(), ANONYMOUS_ID) for event in batch.events]


def measure(count: int) -> dict:
    batches, _ = pack_batches(realistic_events(count))
    bodies = [_batch_body([body for _, body in batch]) for batch in batches]
    started = time.process_time()
    compressed = [gzip.compress(body, compresslevel=GZIP_LEVEL, mtime=0) for body in bodies]
    cpu_ms = (time.process_time() - started) * 1000
    plain, packed = sum(map(len, bodies)), sum(map(len, compressed))
    return {"events": count, "requests": len(bodies), "plain_bytes": plain, "gzip_bytes": packed,
            "ratio": round(packed / plain, 4), "gzip_level": GZIP_LEVEL, "gzip_cpu_ms": round(cpu_ms, 1),
            "plain_bytes_per_event": round(plain / count, 1), "gzip_bytes_per_event": round(packed / count, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wire_bytes", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("wire_bytes.json"))
    args = parser.parse_args(argv)
    result = measure(args.events)
    print(f"| {args.events:,} events | requests | bytes | bytes/event |\n|---|---|---|---|")
    print(f"| plain JSON (before) | {result['requests']} | {result['plain_bytes']:,} | {result['plain_bytes_per_event']} |")
    print(f"| gzip level {GZIP_LEVEL} (now) | {result['requests']} | {result['gzip_bytes']:,} | "
          f"{result['gzip_bytes_per_event']} |")
    print(f"gzip: {result['ratio']:.1%} of the plain bytes, {result['gzip_cpu_ms']} ms of CPU for all of it")
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
