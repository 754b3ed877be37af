"""What is done and what needs a run, read from the Dagster instance and the MLflow registry.

One answer for everyone who asks: the sensors (a run only for work whose inputs changed),
`mm demo` and `mm ingest` (skip what is up to date), and `mm status`. Runs launched
in-process (`mm demo`, `mm ingest`) record their materializations in the same instance, so
a sensor never redoes them: state comes from materializations, not from sensor cursors.

- a landing batch is done when the last `raw_media` materialization of its partition
  recorded the batch's current `landing_digest` (every file's path and fingerprint);
- a subject is done when the last `lora_training_set` of its partition recorded its current
  declaration's `subject_fingerprint`;
- an approved LoRA version is done once it was exported (it carries `mm.bundle_version`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dagster as dg

from mm_pipelines.defs.ingest.jobs import BATCH_ASSETS
from mm_pipelines.storage.landing import Landing

GOING = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]
PARTITION_TAG = "dagster/partition"


def latest(
    instance: dg.DagsterInstance, asset: str, partition: str | None = None
) -> dg.EventLogRecord | None:
    """The newest materialization record of an asset (of one partition)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(
            asset_key=dg.AssetKey(asset),
            asset_partitions=[partition] if partition is not None else None,
        ),
        limit=1,
        ascending=False,
    ).records
    return records[0] if records else None


def metadata_value(record: dg.EventLogRecord | None, key: str) -> Any:
    if record is None or record.asset_materialization is None:
        return None
    value = record.asset_materialization.metadata.get(key)
    return getattr(value, "value", value)


def runs_going(
    instance: dg.DagsterInstance, job: str | None = None, tags: dict[str, str] | None = None
) -> list[dg.DagsterRun]:
    return list(
        instance.get_runs(dg.RunsFilter(job_name=job, statuses=GOING, tags=tags or {}), limit=100)
    )


# --------------------------------------------------------------------------- landing batches


@dataclass(frozen=True)
class BatchState:
    batch: str
    digest: str  # what the landing holds now
    ingested_digest: str | None  # what the last raw_media saw (None: never ingested)
    running: bool
    indexed: bool  # vector_index materialized after the last raw_media

    @property
    def state(self) -> str:
        if self.running:
            return "running"
        if self.ingested_digest is None:
            return "new"
        if self.ingested_digest != self.digest:
            return "changed"
        return "done" if self.indexed else "not indexed"

    @property
    def needs_run(self) -> bool:
        return self.state in ("new", "changed")


def batch_state(instance: dg.DagsterInstance, landing: Landing, batch: str) -> BatchState:
    ingested = latest(instance, BATCH_ASSETS[0], batch)
    indexed = latest(instance, BATCH_ASSETS[-1], batch)
    going = runs_going(instance, "batch_pipeline", {PARTITION_TAG: batch})
    return BatchState(
        batch,
        landing.digest(batch),
        metadata_value(ingested, "landing_digest"),
        bool(going),
        ingested is not None and indexed is not None and indexed.storage_id > ingested.storage_id,
    )


def done_after_ingest(instance: dg.DagsterInstance, batch: str, asset: str) -> bool:
    """`asset` of the batch was materialized after the batch's last raw_media."""
    ingested = latest(instance, BATCH_ASSETS[0], batch)
    if ingested is None:
        return False
    if asset == BATCH_ASSETS[0]:
        return True
    record = latest(instance, asset, batch)
    return record is not None and record.storage_id > ingested.storage_id


def landing_states(instance: dg.DagsterInstance, landing: Landing) -> list[BatchState]:
    """Every ready batch of the landing area (one removed while it is read is left out)."""
    states = []
    for batch in landing.ready_batches():
        try:
            states.append(batch_state(instance, landing, batch))
        except FileNotFoundError:
            continue
    return states


# --------------------------------------------------------------------------- subjects


@dataclass(frozen=True)
class SubjectState:
    name: str
    fingerprint: str
    trained_fingerprint: str | None
    running: bool

    @property
    def state(self) -> str:
        if self.running:
            return "running"
        if self.trained_fingerprint is None:
            return "new"
        return "done" if self.trained_fingerprint == self.fingerprint else "changed"

    @property
    def needs_run(self) -> bool:
        return self.state in ("new", "changed")


def subject_states(
    instance: dg.DagsterInstance, fingerprints: dict[str, str]
) -> list[SubjectState]:
    """Each declared subject (name -> fingerprint of its declaration) against its runs."""
    out = []
    for name, fingerprint in sorted(fingerprints.items()):
        record = latest(instance, "lora_training_set", name)
        going = runs_going(instance, "subject_pipeline", {PARTITION_TAG: name})
        out.append(
            SubjectState(
                name, fingerprint, metadata_value(record, "subject_fingerprint"), bool(going)
            )
        )
    return out


# --------------------------------------------------------------------------- serving


def exports_needed(instance: dg.DagsterInstance, client: Any) -> list[Any]:
    """Approved LoRA versions never exported, with no export of them going."""
    from mm_pipelines.pipeline import registry

    going = {
        (r.tags.get("mm/model"), r.tags.get("mm/version"))
        for r in runs_going(instance, "export_online_model")
    }
    return [
        c
        for c in registry.approved_candidates(client)
        if registry.BUNDLE_TAG not in c.tags and (c.name, c.version) not in going
    ]
