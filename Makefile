# The project's only entry points; CI and people run exactly these.
.PHONY: setup run test check bench clean

setup:  ## install everything into .venv (and mosquitto via apt when missing)
	@scripts/setup

run: setup  ## the whole pipeline (iotpipe up): edge broker, bridge, RabbitMQ, consumer, simulated fleet
	@scripts/run

test: setup  ## the whole test suite against real brokers
	.venv/bin/pytest

check: setup  ## lint and types
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

bench: setup  ## benchmarks (not tests): print JSON, write bench/results/
	.venv/bin/pip install -q -e '.[dev,bench]'  # matplotlib for bench_e2e's plot, py-spy
	.venv/bin/python bench/bench_simulator.py
	.venv/bin/python bench/bench_spool.py
	.venv/bin/python bench/bench_broker_store.py
	.venv/bin/python bench/bench_amqp.py
	.venv/bin/python bench/bench_bridge.py
	.venv/bin/python bench/bench_bridge.py --receipts  # receipts on vs off
	.venv/bin/python bench/bench_uplink.py  # WAN bytes and CPU per reading, messages vs packed
	.venv/bin/python bench/bench_limits.py  # a device at 20x its limit beside a fleet
	.venv/bin/python bench/bench_ingest.py  # mapped JSON and Sparkplug B vs native envelopes
	.venv/bin/python bench/bench_broker.py --profile  # embedded broker vs Mosquitto; py-spy
	.venv/bin/python bench/bench_influx.py
	.venv/bin/python bench/bench_consume.py
	.venv/bin/python bench/bench_e2e.py --influx --profile 1000,5000  # + VictoriaMetrics; py-spy
	.venv/bin/python bench/bench_e2e.py --receipts --rates 1000,max  # receipt latency, overload
	.venv/bin/python bench/bench_dashboard.py
	.venv/bin/python bench/bench_edge.py

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache .hypothesis
