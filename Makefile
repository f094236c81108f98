# The two commands: `make demo` and `make test`. Both install first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch/torchvision are pinned only here, to the pair this machine's wheel cache holds;
# setup.py asks for ranges so the package installs anywhere.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install lint test test-fast test-slow demo clean

install: $(STAMP)

# the installed copy (console commands) follows the checkout's code
$(STAMP): setup.py $(shell git ls-files '*.py' 2>/dev/null)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q ".[test,deploy,imagenet,timm,tune]"
	touch $(STAMP)

# what CI runs: the lint, then every test
test: install lint
	$(PY) -m pytest -q tests

# the unit tests only (no end-to-end runs): about a minute on 2 cores
test-fast: install lint
	$(PY) -m pytest -q -m "not e2e" tests

lint: install
	$(PY) -m ruff check .

# torch.compile's CPU twins: minutes of first compilation, so outside `make test`
test-slow: install
	$(PY) -m pytest -q --runslow -m slow tests

demo: install
	bash scripts/demo.sh

clean:
	rm -rf $(VENV) save/demo
