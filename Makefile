# One command for the demo, one for the tests; both install what they need.
.PHONY: setup demo test lint unit integration bench clean

setup:
	./scripts/bootstrap.sh

# make demo VM=1: the guest is a QEMU VM instead of a network namespace.
demo: setup
	.venv/bin/python -m scripts.demo $(if $(filter-out 0,$(VM)),--vm)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	proto/generate.sh --check

unit: setup
	.venv/bin/pytest tests/unit

integration: setup
	.venv/bin/pytest tests/integration

test: lint
	.venv/bin/pytest

bench: setup
	.venv/bin/python -m bench.repair
	.venv/bin/python -m bench.throughput

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache .hypothesis
