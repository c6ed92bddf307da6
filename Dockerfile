# syntax=docker/dockerfile:1
# The code location image (target `code-location`, run by the Dagster+ ECS agent) and the
# image the Kubeflow components run in on Vertex AI (target `components`): one locked set of
# dependencies, so a component runs exactly the code the code location compiled it from.
#
#   docker build --target code-location -t ml-platform:dev .
#   docker build --target components -t ml-platform-components:dev .

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never

# -- build: the locked environment and the dbt manifest ----------------------------------
FROM base AS build
RUN pip install --no-cache-dir uv==0.13.9
WORKDIR /app
# The venv's tools (dbt, dagster-dbt) first on PATH, as `uv run` would put them.
ENV PATH=/app/.venv/bin:$PATH
# Dependencies first, in their own layer: it is rebuilt only when the lock changes.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY ml_platform ml_platform
COPY dbt_project dbt_project
COPY workspace.yaml ./
# The project itself, installed from /app (editable): the dbt project and the compiled
# manifest are found next to the package, as in a checkout.
RUN uv sync --frozen --no-dev \
    # The dbt manifest, so that loading the code location never runs `dbt parse`.
    && dagster-dbt project prepare-and-package --file ml_platform/assets/dbt.py \
    # UV_COMPILE_BYTECODE compiles the dependencies; the editable project needs its own.
    && python -m compileall -q ml_platform \
    && rm -rf dbt_project/logs

# -- runtime: what both images share ------------------------------------------------------
FROM base AS runtime
# A user of its own: nothing in the image runs as root.
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin app \
    # DAGSTER_HOME must exist for a code server or run started without an instance ref.
    && install -d -o 10001 -g 10001 /home/app/dagster_home
WORKDIR /app
COPY --from=build --chown=10001:10001 /app /app
ENV PATH=/app/.venv/bin:$PATH \
    DAGSTER_HOME=/home/app/dagster_home \
    ML_PLATFORM_DATA_DIR=/home/app/data
USER 10001:10001

# Vertex AI runs components with the command kfp compiled into the template
# (`python3 -m kfp.dsl.executor_main ...`); python3 here is the project's venv.
FROM runtime AS components

# The code server the agent starts (it passes its own command; this is the default).
FROM runtime AS code-location
EXPOSE 4000
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s \
    CMD ["dagster", "api", "grpc-health-check", "-p", "4000"]
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", "-m", "ml_platform.definitions"]
