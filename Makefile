# Two commands do everything on a fresh machine (Python 3.11+ with pip, and make):
#   make run    install, then materialize the whole asset graph offline (local backends)
#   make test   install, then lint and run the test suite
# Nothing else needs installing by hand: uv comes from PyPI into .tools/ if not on PATH.

UV_VERSION := 0.13.9
UV := $(or $(shell command -v uv 2>/dev/null),$(CURDIR)/.tools/bin/uv)
export DAGSTER_HOME := $(CURDIR)/dagster_home
export UV_FROZEN := 1
# Compile every installed package to bytecode once, at install: every Dagster process (run
# worker, code server, kfp component) imports dagster, dbt, kfp, pandas or scikit-learn,
# and without .pyc files (PYTHONDONTWRITEBYTECODE, read-only venvs) each import compiles
# them from source again: about 2 s more per code-location import. The project itself is
# installed editable (uv leaves it out), hence the compileall in `install`.
export UV_COMPILE_BYTECODE := 1

.PHONY: run test dev install prepare bench clean

# The code location parses the dbt project itself when the manifest is missing or older
# than a file of the project (ml_platform/assets/dbt.py), so no target needs `prepare`.
run: install
	$(UV) run ml-platform materialize

test: install
	scripts/ensure-chromium
	$(UV) run ruff check .
	$(UV) run ruff format --check .
	$(UV) run pytest

dev: install
	$(UV) run dg dev -w workspace.yaml

bench: install
	$(UV) run python bench/run_all.py

install: $(UV)
	$(UV) sync --frozen
	$(UV) run --no-sync python -m compileall -q ml_platform

# The dbt manifest, built ahead (the image build runs this step).
prepare: install
	$(UV) run dagster-dbt project prepare-and-package --file ml_platform/assets/dbt.py

$(CURDIR)/.tools/bin/uv:
	python3 -m venv $(CURDIR)/.tools
	$(CURDIR)/.tools/bin/pip install --quiet uv==$(UV_VERSION)

clean:
	rm -rf data dbt_project/target dagster_home/storage dagster_home/history dagster_home/schedules dagster_home/logs
