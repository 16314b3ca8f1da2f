# The benchmark of issue 5; method and latest numbers in docs/benchmarks.md.
# Needs redis-server and, for the load, wrk (apt-get install redis-server wrk);
# without wrk the load comes from bench/loadgen.py.
PYTHON ?= python3

.PHONY: bench bench-smoke

# Full run, about three minutes: prints the table and writes bench/results.json.
bench:
	$(PYTHON) -m bench

# Quick run, about half a minute: the same keys with rough numbers, written to the
# temporary folder (never over bench/results.json). The test suite runs it too.
bench-smoke:
	$(PYTHON) -m bench --quick
