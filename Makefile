# The README's two commands. Each creates .venv when missing and installs into it once, from a lock: every package
# at the exact version the suite last passed with (requirements/test.lock for `make test`, its subset
# requirements/zoo.lock for `make demo`). The install is redone only when pyproject.toml, constraints.txt or a lock
# change, because the stamp file's name carries a hash of them all.
# `make lock` regenerates the locks (requirements/lock.sh: fresh temporary virtualenvs, never .venv); run it after
# changing a dependency in pyproject.toml, then `make test`, and commit the locks with the change.
# `make test-latest` runs the suite against the newest releases the pyproject ranges allow, in .venv-latest.
.PHONY: demo test lock test-latest

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# -c constraints.txt keeps torch at the pinned CPU build: an unpinned torch would pull gigabytes of CUDA wheels.
PIP := $(BIN)/python -m pip install --progress-bar off -c constraints.txt
# The embedded models' packages (exact versions, installed --no-deps: see the file).
EMBEDDED := requirements/embedded.lock
EMBEDDED_NAMES := $(shell sed -n 's/==.*//p' $(EMBEDDED))
KEY := $(shell cat pyproject.toml constraints.txt requirements/*.lock | sha256sum | cut -c1-16)

# The main job: Wanda at 50% on the embedded SmolLM2-135M, perplexity before and after, a folder that loads anywhere.
demo: $(VENV)/.installed-zoo-$(KEY)
	HF_HUB_OFFLINE=1 $(BIN)/prunekit prune smollm2-135m --method wanda --sparsity 0.5 --n-samples 32 \
		--eval-tokens 4096 --out runs/smollm2-wanda50 --overwrite

test: $(VENV)/.installed-test-$(KEY)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# One stamp per extra ('zoo' for the demo, 'test' for the tests); older stamps of that extra are removed.
# The lock holds every dependency, so pip resolves nothing beyond it; prunekit itself goes in last, --no-deps.
$(VENV)/.installed-%-$(KEY): | $(BIN)/python
	$(PIP) -r requirements/$*.lock
	$(PIP) --no-deps -r $(EMBEDDED)
	$(PIP) --no-deps -e .
	rm -f $(VENV)/.installed-$*-*
	touch $@

lock:
	PYTHON=$(PYTHON) requirements/lock.sh

# Not part of CI: a report of whether the newest releases still pass (the locked run is the one that counts).
LATEST := .venv-latest
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --progress-bar off -c constraints.txt --upgrade --upgrade-strategy eager \
		-e '.[test]'
	$(LATEST)/bin/python -m pip install --progress-bar off --no-deps -r $(EMBEDDED)
	$(LATEST)/bin/python -m pip freeze --all --exclude-editable --exclude pip $(EMBEDDED_NAMES:%=--exclude %) \
		| diff requirements/test.lock - | sed -n 's/^> /not the locked version: /p'
	HF_HUB_OFFLINE=1 $(LATEST)/bin/python -m pytest
