"""Experiment tracking: one MLflow run per piece of work, always closed, with batched step
metrics and one way to publish a trained model (model store -> MLflow artifacts ->
registered version that carries the store URI and digest)."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mm_pipelines import settings
from mm_pipelines.pipeline.faults import InfrastructureError
from mm_pipelines.pipeline.model_store import Artifact, ModelStore

# a tracking server that does not take a TCP connection within this is down: say so at once
CONNECT_TIMEOUT_S = 3.0


class TrackingUnavailable(InfrastructureError):
    """The MLflow tracking store does not answer (the message names its URI)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retriable=True)


def _check_reachable(uri: str) -> None:
    """Fail in seconds, naming the URI, when an MLflow server cannot be reached: MLflow's
    own client retries a refused or black-holed connection for minutes."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise TrackingUnavailable(
            f"the MLflow tracking server {uri} is unreachable ({err or type(err).__name__}); "
            "check MLFLOW_TRACKING_URI and that the server runs"
        ) from err


@dataclass(frozen=True)
class RunSpec:
    """How the caller wants a run named and tagged (Dagster adds its run, asset, partition)."""

    name: str
    tags: dict[str, str] = field(default_factory=dict)

    def with_tags(self, **tags: str) -> RunSpec:
        return RunSpec(self.name, {**self.tags, **tags})


@dataclass
class Tracker:
    """Where runs go: a tracking URI (sqlite file, or an MLflow server), an artifact root for
    new experiments, the experiment, and the UI base URL for links."""

    tracking_uri: str = ""
    artifact_root: str = ""
    experiment: str = "mm_pipelines"
    ui_url: str = ""

    def setup(self) -> str:
        """Point MLflow at our tracking store; return the experiment id (created if new)."""
        import mlflow

        settings.apply_mlflow_http_defaults()
        uri = self.tracking_uri or settings.mlflow_tracking_uri()
        _check_reachable(uri)
        mlflow.set_tracking_uri(uri)
        try:
            existing = mlflow.get_experiment_by_name(self.experiment)
        except mlflow.exceptions.MlflowException as err:
            if "failed with exception" not in str(err):  # MLflow's words for a failed request
                raise
            raise TrackingUnavailable(
                f"the MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is unreachable "
                f"({settings.mlflow_http_settings()}): {err}"
            ) from err
        if existing is not None:
            return existing.experiment_id
        root = (self.artifact_root or settings.mlflow_artifact_root()).rstrip("/")
        try:
            # "mlflow-artifacts:/" + "/name" would name a host ("mlflow-artifacts://name"),
            # which the tracking server refuses: one slash between root and experiment
            return mlflow.create_experiment(
                self.experiment, artifact_location=f"{root}/{self.experiment}"
            )
        except mlflow.exceptions.MlflowException:  # created by a concurrent process
            return mlflow.get_experiment_by_name(self.experiment).experiment_id

    def client(self) -> Any:
        """An MlflowClient on our tracking store (registry: aliases, tags)."""
        import mlflow

        self.setup()
        return mlflow.MlflowClient()

    @contextlib.contextmanager
    def run(self, spec: RunSpec) -> Iterator[TrackedRun]:
        """Open a run; close it FINISHED on success, KILLED on an interrupt, FAILED on any
        other error."""
        import mlflow

        experiment_id = self.setup()
        active = mlflow.start_run(experiment_id=experiment_id, run_name=spec.name, tags=spec.tags)
        run = TrackedRun(active, self)
        try:
            yield run
        except BaseException as err:
            # interrupts are not Exceptions: KeyboardInterrupt, SystemExit, and the error
            # Dagster raises in a step on SIGINT/SIGTERM
            status = "FAILED" if isinstance(err, Exception) else "KILLED"
            with contextlib.suppress(Exception):  # the step's own error is what matters
                run.flush()
            mlflow.end_run(status=status)
            raise
        run.flush()
        mlflow.end_run(status="FINISHED")

    def close_running(self, tags: dict[str, str], status: str = "KILLED") -> list[str]:
        """Close the runs of our experiment that are still RUNNING with these tags (their
        process died without closing them); return their ids."""
        client = self.client()
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            return []
        where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = client.search_runs(
            [experiment.experiment_id], filter_string=f"{where} and attributes.status = 'RUNNING'"
        )
        for found in runs:
            client.set_terminated(found.info.run_id, status=status)
        return [found.info.run_id for found in runs]

    def run_url(self, experiment_id: str, run_id: str) -> str:
        base = (self.ui_url or settings.mlflow_ui_url()).rstrip("/")
        return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


@dataclass
class Published:
    artifact: Artifact
    registered_name: str
    registered_version: str


@dataclass
class TrackedRun:
    """An open MLflow run. Step metrics are buffered and written in batches: one MLflow
    write per step (sqlite transaction or HTTP request) cost ~25% of a 50 ms LoRA step
    here, even queued asynchronously; batched it is noise (bench_lora.py)."""

    mlflow_run: Any
    tracker: Tracker
    batch_every: int = 50
    _pending: list[Any] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return self.mlflow_run.info.run_id

    @property
    def info(self) -> Any:
        return self.mlflow_run.info

    @property
    def url(self) -> str:
        return self.tracker.run_url(self.mlflow_run.info.experiment_id, self.run_id)

    def params(self, values: dict[str, Any]) -> None:
        import mlflow

        mlflow.log_params({k: v for k, v in values.items()})

    def step(self, key: str, value: float, step: int) -> None:
        """A per-step training metric (batched)."""
        from mlflow.entities import Metric

        self._pending.append(Metric(key, float(value), int(time.time() * 1000), int(step)))
        if len(self._pending) >= self.batch_every:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            import mlflow

            mlflow.MlflowClient().log_batch(self.run_id, metrics=list(self._pending))
            self._pending.clear()

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)

    def tags(self, values: dict[str, str]) -> None:
        import mlflow

        mlflow.set_tags(values)

    def image(self, image: Any, artifact_file: str) -> None:
        import mlflow

        mlflow.log_image(image, artifact_file=artifact_file)

    def json(self, data: dict[str, Any], artifact_file: str) -> None:
        import mlflow

        mlflow.log_dict(data, artifact_file)

    def artifacts(self, folder: str | Path, artifact_path: str) -> None:
        import mlflow

        mlflow.log_artifacts(str(folder), artifact_path=artifact_path)

    def register(self, artifact_path: str, name: str, tags: dict[str, str] | None = None) -> str:
        """Register the run's artifact folder as a new version of model `name`."""
        import mlflow

        client = mlflow.MlflowClient()
        if not client.search_registered_models(filter_string=f"name = '{name}'"):
            with contextlib.suppress(mlflow.exceptions.MlflowException):  # made concurrently
                client.create_registered_model(name)
        version = client.create_model_version(
            name,
            f"{self.mlflow_run.info.artifact_uri}/{artifact_path}",
            run_id=self.run_id,
            tags=tags,
        )
        return str(version.version)

    def publish(
        self,
        store: ModelStore,
        kind: str,
        name: str,
        folder: str | Path,
        *,
        registered_name: str,
        version: str | None = None,
        metadata: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
        artifact_path: str | None = None,
    ) -> Published:
        """The one way a trained model is published: into the model store (immutable, then
        the current pointer), into this run's artifacts, and as a registered version whose
        tags name the store URI and manifest digest it came from."""
        artifact = store.put(kind, name, folder, version=version, metadata=metadata)
        store.set_current(kind, name, artifact.version)
        path = artifact_path or kind
        self.artifacts(folder, path)  # the files as trained, without the store's manifest
        registered = self.register(
            path, registered_name, tags={**(tags or {}), **store_tags(artifact)}
        )
        return Published(artifact, registered_name, registered)

    def link_version(self, registered_name: str, version: str, artifact: Artifact) -> None:
        """Tag an already registered version with the store artifact it corresponds to (for a
        model stored after registering, e.g. one whose store version names the registered)."""
        import mlflow

        client = mlflow.MlflowClient()
        for key, value in store_tags(artifact).items():
            client.set_model_version_tag(registered_name, version, key, value)


def store_tags(artifact: Artifact) -> dict[str, str]:
    """What ties a registered MLflow version to the bytes steps read from the model store."""
    return {
        "mm.store_uri": artifact.uri,
        "mm.store_version": artifact.version,
        "mm.store_digest": artifact.digest,
    }
