"""The load of the server benchmark when wrk is not installed: the cycle of bench/mix.lua
over raw keep-alive HTTP/1.1 connections on one asyncio loop.

    python -m bench.loadgen PORT CONNECTIONS SECONDS

Prints the same JSON line as mix.lua's `done`. It is about three times faster than the
example server on one core, so it measures the server, but wrk (C) leaves the server more
of a shared machine: prefer wrk for the published numbers.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from bench.stats import percentile

HEADERS = "X-Rubrix-Api-Key: rubrix.apikey\r\nUser-Agent: bench/1.0\r\nAccept-Language: en\r\n"


def request_cycle(port: int) -> list[bytes]:
    records = ", ".join(f'{{"id": {i}, "inputs": {{"text": "benchmark record number {i}"}}}}' for i in range(1, 11))
    body = f'{{"records": [{records}]}}'.encode()
    host = f"Host: 127.0.0.1:{port}\r\n"
    me = f"GET /api/me HTTP/1.1\r\n{host}{HEADERS}\r\n".encode()
    bulk = (f"POST /api/datasets/bench/TextClassification:bulk HTTP/1.1\r\n{host}{HEADERS}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    unknown = f"GET /api/datasets/unknown HTTP/1.1\r\n{host}{HEADERS}\r\n".encode()
    return [me, bulk, me, bulk, unknown]


async def connection(port: int, deadline: float, latencies: list[float], counts: dict[str, int]) -> None:
    cycle = request_cycle(port)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        position = 0
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            writer.write(cycle[position % len(cycle)])
            position += 1
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            counts["non_2xx"] += not head.startswith(b"HTTP/1.1 2")
    except (OSError, asyncio.IncompleteReadError):
        counts["socket_errors"] += 1
    finally:
        writer.close()


async def run(port: int, connections: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    counts = {"non_2xx": 0, "socket_errors": 0}
    started = time.perf_counter()
    await asyncio.gather(*(connection(port, started + seconds, latencies, counts) for _ in range(connections)))
    duration = time.perf_counter() - started
    return {"requests": len(latencies), "duration_s": duration, "rps": len(latencies) / duration, **counts,
            "p50_ms": percentile(latencies, 50) * 1000, "p99_ms": percentile(latencies, 99) * 1000}


def main(argv: list[str]) -> int:
    port, connections, seconds = int(argv[0]), int(argv[1]), float(argv[2])
    print(json.dumps(asyncio.run(run(port, connections, seconds))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
