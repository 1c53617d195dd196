# Every target builds .venv on first use: torch (CPU build from disk) first, then the project.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedlora simulate simulations/quickstart.toml

# Two workers, a test file each at a time: the end-to-end tests spend much of their time waiting
# on Ray and Flower processes, which the other worker's tests fill. They take the files in the
# order tests/conftest.py sets (--no-loadscope-reorder): the slow end-to-end ones first, the many
# short ones last, to even out the workers' finishing times. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2

test: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=20 tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m tests.benchmarks.run_all

clean:
	rm -rf $(VENV) runs
