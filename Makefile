# vmferry: every entry point a person or CI needs.  Each target installs what
# it needs (Debian packages, a virtualenv) and is safe to run again.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Debian 12 packages: the engine's build and the real servers tests run.
DEB_PKGS := build-essential pkg-config cmake python3-venv python3-dev nftables \
            libnbd-dev libnbd-bin libgnutls28-dev nbdkit qemu-utils qemu-system-x86 binutils \
            openssh-server openssh-client iproute2 openssl

EXT_SRC := $(wildcard ext/*.c ext/*.h) src/vmferry/_engine.pyx src/vmferry/_engine.pxd setup.py
SO := $(firstword $(wildcard src/vmferry/_engine*.so))

.PHONY: all deps venv build test test-c test-py demo bench bench-presync clean

all: build

.stamp-deps: Makefile
	@missing=$$(for p in $(DEB_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@touch $@

deps: .stamp-deps

# Order-only: a venv made once is kept (its python is a link to the system's,
# older than any stamp, so a normal prerequisite would remake it every run).
$(VPY): | .stamp-deps
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

.stamp-venv: $(VPY) pyproject.toml
	$(VPY) -m pip install -q "Cython>=3.0" "setuptools>=77" wheel
	$(VPY) -m pip install -q -e '.[test,bench]'
	@touch $@

venv: .stamp-venv

# Rebuild the extension in place whenever the C or Cython sources change.
.stamp-build: .stamp-venv $(EXT_SRC)
	$(VPY) setup.py -q build_ext --inplace
	@touch $@

build: .stamp-build

# C unit tests under AddressSanitizer and UBSan, run by ctest.
test-c: .stamp-deps
	cmake -S . -B build-asan -DVMFERRY_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug >/dev/null
	cmake --build build-asan -j2 >/dev/null
	cd build-asan && ctest --output-on-failure

test-py: .stamp-build
	$(VPY) -m pytest -q tests

test: test-c test-py

demo: .stamp-build
	$(VPY) -m vmferry demo

# every bench/bench_*.py: copy, zerocopy, zc_sizes, migrate, remote, native_remote, storage, tunnel, presync
bench: .stamp-build
	$(VPY) -m pytest -q bench -p no:cacheprovider

# One group on its own: issue 12's pre-seeding target (1 Gbit/s link, 8 GiB disk).
bench-presync: .stamp-build
	$(VPY) -m pytest -q -s bench/bench_presync.py -p no:cacheprovider

clean:
	rm -rf build build-asan .stamp-build src/vmferry/_engine.c src/vmferry/_engine*.so
