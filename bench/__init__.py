"""The benchmark of issue 5: what telemetry costs a Rubrix server, and how fast it delivers.

    python -m bench            # full run (a few minutes), writes bench/results.json
    python -m bench --quick    # smoke run (seconds), same keys, rougher numbers

Every configuration runs in its own child process, because the hooks and the workers
read their settings once at import, as a real server and worker do. Everything runs on
loopback against a redis-server and a Segment-compatible sink that the bench starts
itself; docs/benchmarks.md describes the method and the latest numbers.
"""
