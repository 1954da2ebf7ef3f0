# `make run`  : the main job - train the `tiny` preset on the built-in corpus (the Python standard library)
# `make test` : the test suite
# Both create .venv themselves. Where there is no CUDA GPU, the CPU build of torch is installed first so
# that pip never pulls the multi-GB CUDA wheel.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
CPU_TORCH ?= torch==2.13.0
RUN    ?= runs/tiny

.PHONY: run test venv clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA GPU found: torch comes from the package requirements"; \
	else \
		$(PIP) install -q "$(CPU_TORCH)"; \
	fi
	touch $@

$(VENV)/.installed-core: $(VENV)/.created pyproject.toml
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.created pyproject.toml
	$(PIP) install -q -e ".[dev]"
	touch $(VENV)/.installed-core $@

venv: $(VENV)/.installed-dev

run: $(VENV)/.installed-core
	$(VENV)/bin/dsmoe train --preset tiny --out $(RUN) --overwrite
	$(VENV)/bin/dsmoe eval $(RUN)
	$(VENV)/bin/dsmoe generate $(RUN) --prompt "def " --max-new-tokens 80 --seed 0

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
