# One command for the demo, one for the tests; both install what they need.
.PHONY: setup demo test lint unit integration bench clean install uninstall deb

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

# ferry on this host (scripts/install.sh says what goes where): PREFIX
# (default /usr/local), DESTDIR to stage instead.
PREFIX ?= /usr/local
DESTDIR ?=

install:
	PREFIX=$(PREFIX) DESTDIR=$(DESTDIR) ./scripts/install.sh install

uninstall:
	PREFIX=$(PREFIX) DESTDIR=$(DESTDIR) ./scripts/install.sh uninstall

# The same tree as a Debian package, PREFIX=/usr: build/ferry_VERSION_ARCH.deb.
deb:
	./scripts/install.sh deb
