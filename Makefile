# The benchmark of issue 5; method and latest numbers in docs/benchmarks.md.
# Needs redis-server and, for the load, wrk (apt-get install redis-server wrk);
# without wrk the load comes from bench/loadgen.py.
PYTHON ?= python3

.PHONY: bench bench-smoke costs soak

# Full run: the server's costs (about five minutes: bench/results.json), then the costs as a
# function of what waits (`make costs`, below: bench/costs.json); each prints its table.
bench:
	$(PYTHON) -m bench
	$(PYTHON) -m bench.costs --brokers $(BROKERS)

# Quick run, about half a minute: the same keys with rough numbers, written to the
# temporary folder (never over bench/results.json). The test suite runs it too.
bench-smoke:
	$(PYTHON) -m bench --quick

# Costs as a function of what waits (issue 22; docs/benchmarks.md): the backlog check, broker
# bytes per event, a 20,000-message drain and a quiet server's latency, per broker (the embedded
# queue, a redis-server of its own, a vhost on the machine's RabbitMQ), beside Segment's client;
# about 15 (merged code) to 30 (before) minutes, writes bench/costs.json. BROKERS=embedded,redis to measure fewer.
BROKERS ?= embedded,redis,rabbitmq
costs:
	$(PYTHON) -m bench.costs --brokers $(BROKERS)

# The scale-out soak (docs/reliability.md): 2 servers, 3 workers, 10,000 events/s for
# 60 s, one worker SIGKILLed midway; BROKER=redis (its own redis-server) or rabbitmq
# (the machine's, in a vhost of its own).
BROKER ?= redis
soak:  # make soak BROKER=rabbitmq
	$(PYTHON) -m bench.soak --broker $(BROKER)
