"""deploy/gcp: the files its README applies agree with the code and the workflows.

No Google API can be reached from here, so these check what can go wrong on our side: the
files parse, every file the README applies exists, the cleanup policies keep every tag the
workflows publish for people and schedules to pin, and the bucket's lifecycle rule reaches
exactly the branch deployments' pipeline roots (as Settings names them), never prod's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from ml_platform.resources.artifacts import split_gcs_uri
from ml_platform.settings import Settings

ROOT = Path(__file__).parents[2]
GCP_DIR = ROOT / "deploy" / "gcp"
GCP = {"ML_PLATFORM_GCP_PROJECT": "acme-ml", "ML_PLATFORM_GCS_BUCKET": "acme-ml-pipelines"}


def test_every_file_the_readme_applies_exists_and_parses():
    readme = (GCP_DIR / "README.md").read_text()
    applied = set(re.findall(r"--(?:policy|lifecycle-file)=(\S+)", readme))
    assert applied == {
        "deploy/gcp/artifact-cleanup-policies.json",
        "deploy/gcp/bucket-lifecycle.json",
    }
    for path in applied:
        json.loads((ROOT / path).read_text())


def cleanup_policies() -> list[dict]:
    return json.loads((GCP_DIR / "artifact-cleanup-policies.json").read_text())


def test_cleanup_policies_have_the_documented_shape():
    policies = cleanup_policies()
    # At most 10 policies per repository; a policy is either conditional or a "keep the
    # most recent versions" one, never both.
    assert len(policies) <= 10
    assert len({policy["name"] for policy in policies}) == len(policies)
    for policy in policies:
        assert policy["action"]["type"] in {"Delete", "Keep"}
        assert ("condition" in policy) != ("mostRecentVersions" in policy), policy["name"]
        condition = policy.get("condition", {})
        assert condition.get("tagState", "any") in {"tagged", "untagged", "any"}
        for age in ("olderThan", "newerThan"):
            if age in condition:
                assert re.fullmatch(r"\d+d", condition[age]), condition[age]
        if policy["action"]["type"] == "Delete":
            assert "condition" in policy


def publish_tags() -> set[str]:
    """The template tags the workflows publish, as written in their scripts."""
    tags = set()
    for path in (ROOT / ".github" / "workflows").glob("*.yml"):
        for job in yaml.safe_load(path.read_text())["jobs"].values():
            for step in job.get("steps", []):
                tags.update(re.findall(r"--tag\s+\"?([\w$.{}-]+)", step.get("run", "")))
                env_tag = re.search(r"ML_PLATFORM_TEMPLATE_TAG=(\S+)\"", step.get("run", ""))
                if env_tag:
                    tags.add(env_tag.group(1))
    return tags


def test_releases_are_kept_and_commit_builds_expire():
    tags = publish_tags()
    # The release workflow's version tag (from `on: push: tags: [v*]`) and `latest`; the
    # deploy workflow's per-commit tag, and `prod` on what prod runs.
    assert {"$TAG", "latest", "prod"} <= tags
    assert any(tag.startswith("sha-") for tag in tags)
    policies = cleanup_policies()
    kept_prefixes = {
        prefix
        for policy in policies
        if policy["action"]["type"] == "Keep" and "condition" in policy
        for prefix in policy["condition"].get("tagPrefixes", [])
    }
    for release in ("v1.2.0", "v1.3.0-rc.1", "latest", "prod"):
        assert any(release.startswith(prefix) for prefix in kept_prefixes), release
    assert not any("sha-0123abc".startswith(prefix) for prefix in kept_prefixes)
    # Commit builds still survive a quiet month: the newest versions are kept regardless.
    assert any("mostRecentVersions" in policy for policy in policies)
    deletes = [policy for policy in policies if policy["action"]["type"] == "Delete"]
    assert deletes and all(policy["condition"]["tagState"] == "any" for policy in deletes)


def test_bucket_lifecycle_reaches_branch_pipeline_roots_only():
    rules = json.loads((GCP_DIR / "bucket-lifecycle.json").read_text())["rule"]
    prefixes = [prefix for rule in rules for prefix in rule["condition"]["matchesPrefix"]]
    assert all(rule["action"]["type"] == "Delete" for rule in rules)

    prod = Settings.from_env({"DAGSTER_CLOUD_DEPLOYMENT_NAME": "prod", **GCP})
    branch = Settings.from_env(
        {
            "DAGSTER_CLOUD_DEPLOYMENT_NAME": "pr-42",
            "DAGSTER_CLOUD_IS_BRANCH_DEPLOYMENT": "1",
            "DAGSTER_CLOUD_PULL_REQUEST_ID": "42",
            **GCP,
        }
    )
    # Object names in the bucket: the pipeline root without gs://BUCKET/.
    branch_objects = split_gcs_uri(branch.pipeline_root)[1] + "/model/1.joblib"
    prod_objects = split_gcs_uri(prod.pipeline_root)[1] + "/model/1.joblib"
    assert any(branch_objects.startswith(prefix) for prefix in prefixes)
    assert not any(prod_objects.startswith(prefix) for prefix in prefixes)
