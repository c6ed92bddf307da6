"""Render deploy/gcp/iam-bindings.yaml as the gcloud commands that apply it.

    uv run python deploy/gcp/iam_commands.py > /tmp/ml-platform-iam.sh

deploy/gcp/README.md shows this output verbatim (between the `iam-bindings` markers), and
tests/deploy/test_gcp_iam.py fails when the two differ: edit the YAML, then paste the new output
into the README. The commands use the shell variables the README sets in "Before you start".
Every command is idempotent: creating what exists fails harmlessly, adding a binding twice
changes nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

BINDINGS_FILE = Path(__file__).with_name("iam-bindings.yaml")
README_BEGIN = "<!-- iam-bindings:begin (python deploy/gcp/iam_commands.py) -->"
README_END = "<!-- iam-bindings:end -->"


def load(path: Path = BINDINGS_FILE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def email(account: str) -> str:
    return f"{account}@${{PROJECT_ID}}.iam.gserviceaccount.com"


def _resource_command(spec: dict[str, Any], target: str) -> list[str]:
    """The `gcloud ... add-iam-policy-binding` words for a binding on ``target``."""
    if target.startswith("service_account:"):
        account = target.split(":", 1)[1]
        return [
            f'gcloud iam service-accounts add-iam-policy-binding "{email(account)}"',
            '--project="$PROJECT_ID"',
        ]
    resource = spec["resources"][target]
    name = resource["name"]
    kind = resource["kind"]
    if kind == "project":
        return [f'gcloud projects add-iam-policy-binding "{name}"']
    if kind == "bucket":
        return [f'gcloud storage buckets add-iam-policy-binding "gs://{name}"']
    if kind == "repository":
        return [
            f'gcloud artifacts repositories add-iam-policy-binding "{name}"',
            '--project="$PROJECT_ID" --location="$REGION"',
        ]
    raise ValueError(f"unknown resource kind {kind!r} of {target}")


def binding_command(spec: dict[str, Any], account: str, binding: dict[str, Any]) -> str:
    words = _resource_command(spec, binding["resource"])
    if "condition" in binding:
        words.append(f'--condition-from-file="$CONDITIONS/{binding["condition"]}.yaml"')
    elif spec["resources"].get(binding["resource"], {}).get("kind") == "project":
        # A project policy that holds conditional bindings makes gcloud ask; say "none".
        words.append("--condition=None")
    words.append(f'--member="serviceAccount:{email(account)}" --role="{binding["role"]}"')
    return " \\\n  ".join(words)


def render(spec: dict[str, Any]) -> str:
    out: list[str] = []
    out.append("# Custom roles (each holds exactly these permissions).")
    for role_id, role in spec["custom_roles"].items():
        out.append(
            f'gcloud iam roles create {role_id} --project="$PROJECT_ID" --stage=GA \\\n'
            f'  --title="{role["title"]}" \\\n'
            f'  --description="{" ".join(role["description"].split())}" \\\n'
            f"  --permissions={','.join(role['permissions'])}"
        )
    out.append("")
    out.append("# IAM conditions, written once to files that the bindings below name.")
    out.append("CONDITIONS=$(mktemp -d)")
    for name, condition in spec["conditions"].items():
        expression = " ||\n    ".join(
            part.strip() for part in " ".join(condition["expression"].split()).split("||")
        )
        out.append(
            f'cat > "$CONDITIONS/{name}.yaml" <<EOF\n'
            f"title: {condition['title']}\n"
            f"description: {condition['description']}\n"
            f"expression: >-\n    {expression}\n"
            "EOF"
        )
    for account, sa in spec["service_accounts"].items():
        out.append("")
        out.append(f"# {account} ({sa['side']}): {sa['runs']}.")
        out.append(
            f'gcloud iam service-accounts create {account} --project="$PROJECT_ID" \\\n'
            f'  --display-name="{sa["display_name"]}"'
        )
        for principal in sa["impersonated_by"]:
            out.append(
                f'gcloud iam service-accounts add-iam-policy-binding "{email(account)}" \\\n'
                '  --project="$PROJECT_ID" --role=roles/iam.workloadIdentityUser \\\n'
                f'  --member="{principal}"'
            )
        for binding in sa["bindings"]:
            out.append(binding_command(spec, account, binding))
    return "\n".join(out) + "\n"


def readme_block(text: str) -> str:
    """The commands the README shows between its markers, without the ```bash fence."""
    begin, end = text.index(README_BEGIN), text.index(README_END)
    block = text[begin + len(README_BEGIN) : end].strip()
    return block.removeprefix("```bash").removesuffix("```").strip("\n") + "\n"


if __name__ == "__main__":
    sys.stdout.write(render(load()))
