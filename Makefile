# ksymsfs — make help
# Run install: its own venv ($(VENV), not editable), a `ksymsfs` command, the mount helper,
# the systemd unit and the man page. Test install: an editable venv under build/ (test extras).
# DESTDIR=/some/root installs/uninstalls the same files under that root (tests use it); the
# files written still name the real paths ($(VENV)/bin/python).
PYTHON ?= python3
KSYMS ?= /dev/ksyms
DESTDIR ?=
VENV ?= /opt/ksymsfs
SBIN_LINK ?= /usr/local/sbin/ksymsfs
HELPER ?= /usr/sbin/mount.fuse.ksymsfs
UNIT ?= /etc/systemd/system/ksymsfs.service
MANDIR ?= /usr/local/share/man/man8
LLVM_READELF_LINK ?= /usr/local/bin/llvm-readelf
TESTVENV ?= build/venv
PIP_FLAGS = -q --disable-pip-version-check --no-input
export PYTHONDONTWRITEBYTECODE := 1
LAYOUT = PYTHON='$(PYTHON)' VENV='$(VENV)' SBIN_LINK='$(SBIN_LINK)' HELPER='$(HELPER)' \
    UNIT='$(UNIT)' MANDIR='$(MANDIR)' LLVM_READELF_LINK='$(LLVM_READELF_LINK)' KSYMS='$(KSYMS)' \
    DESTDIR='$(DESTDIR)' ./scripts/layout.sh
# the interpreter for tests/lint/bench: the test venv once it exists
TESTPY = $(if $(wildcard $(TESTVENV)/bin/python),$(TESTVENV)/bin/python,$(PYTHON))

.PHONY: help install install-files uninstall install-mount-helper deps deps-run test-venv \
        run test test-fast lint bench clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-22s %s\n", $$1, $$2}'

deps-run: ## apt packages needed to run (as root)
	KSYMSFS_DEPS=run ./scripts/install-deps.sh

deps: ## apt packages needed to run and test (as root)
	./scripts/install-deps.sh

install: deps-run install-files ## run install: apt packages + venv, command, mount helper, unit, man page

install-files: ## the files of the run install only (no apt); honours DESTDIR
	$(LAYOUT) install

install-mount-helper: install-files ## (kept for old scripts) the helper is part of install-files

uninstall: ## remove everything install put anywhere (apt packages stay); honours DESTDIR
	$(LAYOUT) uninstall

$(TESTVENV)/.installed: pyproject.toml
	rm -rf '$(TESTVENV)'
	$(PYTHON) -m venv '$(TESTVENV)'
	'$(TESTVENV)/bin/python' -m pip install $(PIP_FLAGS) -e '.[test]'
	touch $@

test-venv: $(TESTVENV)/.installed ## the test install: editable venv in build/ with the test extras

run: install ## main job: mount the live kernel at $(KSYMS) and show nm/readelf/nlist on it
	KSYMS='$(KSYMS)' KSYMSFS='$(SBIN_LINK)' ./scripts/demo.sh

test: deps install-files test-venv ## the whole test suite, real FUSE mounts and the installed layout included (root)
	'$(TESTVENV)/bin/python' -m pytest -ra --junitxml=build/junit.xml $(PYTEST_ARGS)

test-fast: ## tests without the slow ones, no install step
	$(TESTPY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-vm: test-venv ## boot Debian's kernel under qemu, run the guest scenario (VM_CHURN=ci|long)
	./scripts/vm/install-deps.sh
	mkdir -p build
	KSYMSFS_VM=1 '$(TESTVENV)/bin/python' -m pytest -ra -m vm --junitxml=build/junit-vm.xml tests/vm $(PYTEST_ARGS)

lint: ## ruff
	$(TESTPY) -m ruff check ksymsfs tests scripts

bench: test-venv ## benchmark table (ratios to same-run baselines); JSON in bench-results/, plot in docs/
	'$(TESTVENV)/bin/python' -m pip install $(PIP_FLAGS) -e '.[bench]'
	mkdir -p bench-results docs
	'$(TESTVENV)/bin/python' scripts/bench.py --json bench-results/bench.json --plot docs/scaling.png \
	    $(if $(wildcard build/vm/out/bench-vm.json),--vm-json build/vm/out/bench-vm.json)

clean: ## remove build output (the test venv included)
	rm -rf build dist bench-results .pytest_cache ksymsfs.egg-info
