# libvirt-cgrep: everything runs as root on Debian 12. See README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev \
	pkg-config cpio gcc libc6-dev openssh-server openssh-client busybox-static python3-venv python3-dev procps
PYTEST_ARGS ?=

.PHONY: all install deps venv daemons lab test test-all lint readme demo demo-clean clean

all: install

## install: Debian packages, the venv, running daemons and the lab guest
install: deps venv daemons lab

deps:
	@scripts/install-deps $(APT_PACKAGES)

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,lint]'
	touch $@

daemons:
	@scripts/start-daemons

lab: venv
	$(BIN)/virt-cgrep lab build

## test: the default tier (fits CI's budget)
test: install
	$(BIN)/pytest -m 'not slow' $(PYTEST_ARGS)

## test-all: every tier, slow acceptance runs included
test-all: install
	$(BIN)/pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/tox -e lint,type

## readme: regenerate README.md's CLI reference from the parser
readme: venv
	$(BIN)/python -m libvirt_cgrep.cli.reference --write

## demo: a lab VM protected by an atomic point, checked
demo: install
	@scripts/demo

demo-clean: venv
	@scripts/demo --clean

clean:
	rm -rf $(VENV) .tox .mypy_cache .ruff_cache .pytest_cache
