# One command each: `make demo` (set up + run the offline demo), `make test` (set up +
# run the whole test suite). Everything installs into .venv from requirements.lock.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test dev mlflow lint bench lock clean-state

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv
	$(BIN)/uv pip install -q --python $(BIN)/python -r requirements.lock -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mm demo

test: $(STAMP)
	# the browser test's headless Chromium: a system package (CI runs as root on Debian)
	command -v chromium >/dev/null || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	$(BIN)/pytest

dev: $(STAMP)
	$(BIN)/mm dev

mlflow: $(STAMP)
	$(BIN)/mm mlflow

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	@for b in benchmarks/bench_*.py; do echo "== $$b" >&2; $(BIN)/python $$b || exit 1; done

# re-resolve pinned versions after editing pyproject.toml dependencies
lock: $(STAMP)
	$(BIN)/uv pip compile -q --python $(BIN)/python pyproject.toml --extra dev -o requirements.lock

clean-state:
	-$(BIN)/mm db stop
	rm -rf .mm
