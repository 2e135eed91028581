# libvirt-cgrep: everything runs as root on Debian 12 or 13. See README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev \
	pkg-config cpio gcc libc6-dev openssh-server openssh-client busybox-static python3-venv python3-dev procps
# building and checking the .deb (make deb; tests/test_packaging.py), with Debian's python3 modules
DEB_PACKAGES := build-essential debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools python3-wheel dpkg-dev \
	lintian python3-libvirt python3-lxml python3-prometheus-client python3-zstandard
PYTEST_ARGS ?=

.PHONY: all install deps venv daemons lab test test-all test-platforms test-other demo-other platform lint readme demo demo-clean clean deb deb-check deb-deps man completion print-apt-packages

all: install

## install: Debian packages, the venv, running daemons and the lab guest
install: deps venv daemons lab

deps:
	@scripts/install-deps $(APT_PACKAGES) $(DEB_PACKAGES)
	@scripts/get-promtool

print-apt-packages:
	@echo $(APT_PACKAGES) $(DEB_PACKAGES)

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

## test-platforms: the default tier on this host's Debian release, then on the other one (12 <-> 13)
test-platforms: test test-other

## test-other: the default tier on the other Debian release, in a container (scripts/platform)
test-other:
	scripts/platform run $$(scripts/platform other) -- make test PYTEST_ARGS="$(PYTEST_ARGS)"

## demo-other: make demo on the other Debian release
demo-other:
	scripts/platform run $$(scripts/platform other) -- make demo

## platform: build (or reuse) the other release's tree
platform:
	scripts/platform build $$(scripts/platform other)

## test-all: every tier, slow acceptance runs included
test-all: install
	$(BIN)/pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/tox -e lint,type

## readme: regenerate README.md's CLI reference from the parser
readme: venv
	$(BIN)/python -m libvirt_cgrep.cli.reference --write

## man, completion: regenerate man/virt-cgrep.1 and completion/virt-cgrep.bash from the parser
man: venv
	$(BIN)/python -m libvirt_cgrep.cli.manpage --write

completion: venv
	$(BIN)/python -m libvirt_cgrep.cli.completion --write

## deb: build the Debian package out of tree into build/deb/ (its build dependencies first), then lintian it
deb: deb-deps
	@scripts/build-deb build/deb
	lintian --fail-on error build/deb/virt-cgrep_*_all.deb

## deb-check: the .deb built, installed with apt and used (a lab VM, a point, a sync) in a fresh container of each release
deb-check:
	scripts/platform run bookworm -- scripts/deb-check
	scripts/platform run trixie -- scripts/deb-check

deb-deps:
	@scripts/install-deps $(DEB_PACKAGES)

## demo: a lab VM protected by an atomic point, checked
demo: install
	@scripts/demo

demo-clean: venv
	@scripts/demo --clean

clean:
	rm -rf $(VENV) .tox .mypy_cache .ruff_cache .pytest_cache
