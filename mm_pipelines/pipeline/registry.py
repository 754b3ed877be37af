"""The MLflow model registry: the names of our registered models, their aliases and tags,
which versions are approved and which is online.

Plain Python over an `mlflow.MlflowClient`. The quality gates put the alias `candidate` and
the tag `mm.quality_gate=passed` on a LoRA version; exporting it moves the alias `champion`
to it, and the version it replaces keeps a record of when.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# registered model names
CLIP_MODEL = "mm-clip"
PROJECTOR_MODEL = "mm-unified-projector"
DIFFUSION_BASE_MODEL = "mm-diffusion-base"
LORA_PREFIX = "mm-lora-"
CONTENT_HEADS_MODEL = "mm-content-heads"

# aliases and tags
CANDIDATE = "candidate"
CHAMPION = "champion"
GATE_TAG = "mm.quality_gate"
GATE_FAILURES_TAG = "mm.gate_failures"
BUNDLE_TAG = "mm.bundle_version"  # set on a version once it is exported and published
TRAINING_KEY_TAG = "mm.training_key"  # what the adapter was trained from (lora.training_key)


def lora_model_name(subject: str) -> str:
    return f"{LORA_PREFIX}{subject}"


@dataclass(frozen=True)
class Candidate:
    name: str
    version: str
    run_id: str | None
    last_updated_ms: int
    tags: dict[str, str]

    @property
    def key(self) -> str:
        return f"{self.name}/{self.version}"


def _alias(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def alias_version(client: Any, name: str, alias: str) -> str | None:
    mv = _alias(client, name, alias)
    return str(mv.version) if mv is not None else None


def approved_candidates(client: Any, prefix: str = LORA_PREFIX) -> list[Candidate]:
    """Versions carrying the `candidate` alias whose quality gate passed, oldest first.
    Raises whatever MLflow raises when the tracking server cannot be reached."""
    found = []
    for model in client.search_registered_models(filter_string=f"name LIKE '{prefix}%'"):
        mv = _alias(client, model.name, CANDIDATE)
        if mv is None or (mv.tags or {}).get(GATE_TAG) != "passed":
            continue
        found.append(
            Candidate(
                model.name,
                str(mv.version),
                mv.run_id,
                int(mv.last_updated_timestamp or 0),
                dict(mv.tags or {}),
            )
        )
    return sorted(found, key=lambda c: c.last_updated_ms)


def get_candidate(client: Any, name: str, version: str) -> Candidate:
    mv = client.get_model_version(name, version)
    tags = dict(mv.tags or {})
    if tags.get(GATE_TAG) != "passed":
        raise ValueError(
            f"{name} v{version} has not passed its quality gates "
            f"({GATE_TAG}={tags.get(GATE_TAG)!r}); only approved versions are exported"
        )
    return Candidate(name, str(mv.version), mv.run_id, int(mv.last_updated_timestamp or 0), tags)


def champion(client: Any, name: str) -> str | None:
    return alias_version(client, name, CHAMPION)


def promote(client: Any, name: str, version: str, bundle_version: str) -> str | None:
    """Make `version` the online (`champion`) one; returns the version it replaced.

    The replaced version keeps `mm.replaced_at` / `mm.replaced_by`; the new one gets
    `mm.online_since` / `mm.bundle_version`."""
    now = datetime.now(UTC).isoformat(timespec="seconds")
    previous = champion(client, name)
    if previous is not None and previous != str(version):
        client.set_model_version_tag(name, previous, "mm.replaced_at", now)
        client.set_model_version_tag(name, previous, "mm.replaced_by", str(version))
    client.set_registered_model_alias(name, CHAMPION, str(version))
    client.set_model_version_tag(name, str(version), "mm.online_since", now)
    client.set_model_version_tag(name, str(version), BUNDLE_TAG, bundle_version)
    return previous if previous != str(version) else None


def latest_version(client: Any, name: str) -> dict[str, str]:
    """The newest version of a registered model as manifest fields ({} when none)."""
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        return {}
    mv = max(versions, key=lambda v: int(v.version))
    return {
        "registered_name": name,
        "registered_version": str(mv.version),
        "mlflow_run_id": mv.run_id,
    }


def find_version(client: Any, name: str, tag: str, value: str) -> Any | None:
    """The newest version of `name` whose tag `tag` equals `value` (None when none)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    found = [v for v in versions if (v.tags or {}).get(tag) == value]
    return max(found, key=lambda v: int(v.version)) if found else None


def apply_gate(client: Any, name: str, version: str, failures: list[str]) -> None:
    """Record a gate decision: passed -> tag + `candidate` alias; failed -> tag, reasons,
    and the alias taken away if it pointed at this version."""
    client.set_model_version_tag(name, version, GATE_TAG, "failed" if failures else "passed")
    if failures:
        client.set_model_version_tag(name, version, GATE_FAILURES_TAG, "; ".join(failures))
        if alias_version(client, name, CANDIDATE) == str(version):
            client.delete_registered_model_alias(name, CANDIDATE)
    else:
        client.set_registered_model_alias(name, CANDIDATE, version)
