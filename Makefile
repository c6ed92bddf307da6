# Two commands do everything on a fresh machine (Python 3.11+ with pip, and make):
#   make run    install, then materialize the whole asset graph offline (local backends)
#   make test   install, then lint and run the test suite
# Nothing else needs installing by hand: uv comes from PyPI into .tools/ if not on PATH.

UV_VERSION := 0.13.9
UV := $(or $(shell command -v uv 2>/dev/null),$(CURDIR)/.tools/bin/uv)
export DAGSTER_HOME := $(CURDIR)/dagster_home
export UV_FROZEN := 1

.PHONY: run test dev install prepare lint bench clean

run: prepare
	$(UV) run ml-platform materialize

test: prepare
	$(UV) run ruff check .
	$(UV) run ruff format --check .
	$(UV) run pytest

dev: prepare
	$(UV) run dagster dev

bench: prepare
	$(UV) run python bench/run_all.py

install: $(UV)
	$(UV) sync --frozen

# The dbt manifest the code location loads (the image build does the same step).
prepare: install
	$(UV) run dagster-dbt project prepare-and-package --file ml_platform/assets/dbt.py

$(CURDIR)/.tools/bin/uv:
	python3 -m venv $(CURDIR)/.tools
	$(CURDIR)/.tools/bin/pip install --quiet uv==$(UV_VERSION)

clean:
	rm -rf data dbt_project/target dagster_home/storage dagster_home/history dagster_home/schedules dagster_home/logs
