# ksymsfs — make help
PYTHON ?= python3
KSYMS ?= /dev/ksyms
export PIP_BREAK_SYSTEM_PACKAGES := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: help install run test test-fast test-vm lint bench install-mount-helper clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-22s %s\n", $$1, $$2}'

install: ## system packages (apt, as root) + this package with test deps
	./scripts/install-deps.sh
	$(PYTHON) -m pip install -q --disable-pip-version-check -e '.[test]'

run: install ## main job: mount the live kernel at $(KSYMS) and show nm/readelf/nlist on it
	KSYMS=$(KSYMS) PYTHON=$(PYTHON) ./scripts/demo.sh

test: install ## the whole test suite, real FUSE mounts included (root)
	mkdir -p build
	$(PYTHON) -m pytest -ra --junitxml=build/junit.xml $(PYTEST_ARGS)

test-fast: ## tests without the slow soak/churn ones, no install step
	$(PYTHON) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-vm: ## boot Debian's kernel under qemu, run the guest scenario (VM_CHURN=ci|long)
	./scripts/vm/install-deps.sh
	mkdir -p build
	KSYMSFS_VM=1 $(PYTHON) -m pytest -ra -m vm --junitxml=build/junit-vm.xml tests/vm $(PYTEST_ARGS)

lint: ## ruff
	$(PYTHON) -m ruff check ksymsfs tests scripts

bench: ## benchmark table (ratios to same-run baselines); JSON in bench-results/, plot in docs/
	$(PYTHON) -m pip install -q --disable-pip-version-check -e '.[bench]'
	mkdir -p bench-results docs
	$(PYTHON) scripts/bench.py --json bench-results/bench.json --plot docs/scaling.png

install-mount-helper: ## let `mount -t fuse.ksymsfs` and /etc/fstab find us (/usr/sbin/mount.fuse.ksymsfs)
	printf '#!/bin/sh\nexec %s -m ksymsfs "$$@"\n' "$$($(PYTHON) -c 'import sys; print(sys.executable)')" > /usr/sbin/mount.fuse.ksymsfs
	chmod 755 /usr/sbin/mount.fuse.ksymsfs

clean: ## remove build output
	rm -rf build bench-results .pytest_cache
