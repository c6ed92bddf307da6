"""Compile the pipelines to the YAML that Vertex AI Pipelines and kfp.local both run."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from kfp import compiler

from ml_platform.pipelines.flight_delay import PIPELINES


def compile_pipeline(name: str, output: Path, *, image: str) -> Path:
    """Compile one pipeline; every component runs in ``image`` (the project's component image).

    The image is set here rather than in each ``@dsl.component`` so one compiled template
    names the image its deployment built, and the template's sha256 changes with it.
    """
    if name not in PIPELINES:
        raise KeyError(f"unknown pipeline {name!r}; known: {', '.join(PIPELINES)}")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        raw = Path(scratch) / "pipeline.yaml"
        compiler.Compiler().compile(PIPELINES[name], str(raw))
        spec = yaml.safe_load(raw.read_text())
    for executor in spec["deploymentSpec"]["executors"].values():
        if "container" in executor:
            executor["container"]["image"] = image
    output.write_text(yaml.safe_dump(spec, sort_keys=True))
    return output


def compile_all(output_dir: Path, *, image: str) -> dict[str, Path]:
    return {
        name: compile_pipeline(name, Path(output_dir) / f"{name}.yaml", image=image)
        for name in PIPELINES
    }
