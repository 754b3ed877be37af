"""Experiment tracking: one MLflow run per piece of work, always closed, with batched step
metrics and one way to publish a trained model (model store -> MLflow artifacts ->
registered version that carries the store URI and digest).

Runs follow MLflow's own conventions where they fit, so its UI shows them as it intends:
the experiment is tagged for model training and links ask for the training view (else
MLflow 3 opens on GenAI traces), images carry a key and step (the run's image slider),
training sets are dataset inputs with their content hash, trained models can be logged
models with a signature, evaluations are child runs of one parent with the same metric
names (MLflow's "compare runs"), and training runs record system metrics.

Every TrackedRun method writes to its own run by id (never to "the active run"), so a
parent and its children can be written in any order."""

from __future__ import annotations

import contextlib
import json
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
            f"the MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is unreachable "
            f"({err or type(err).__name__}; {settings.mlflow_http_settings()}): check the "
            "address and that the server runs"
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
        """Point MLflow at our tracking store; return the experiment id (created if new,
        tagged as a model-training experiment)."""
        import mlflow

        settings.apply_mlflow_http_defaults()
        uri = self.tracking_uri or settings.mlflow_tracking_uri()
        _check_reachable(uri)
        mlflow.set_tracking_uri(uri)
        try:
            existing = mlflow.get_experiment_by_name(self.experiment)
        except mlflow.exceptions.MlflowException as err:
            # MLflow's words for a request that failed, or for an answer that is not MLflow's
            # (a proxy or another server on that address)
            if not any(w in str(err) for w in ("failed with exception", "API request to")):
                raise
            raise TrackingUnavailable(
                f"the MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is unreachable or "
                f"not an MLflow server ({settings.mlflow_http_settings()}): {err}"
            ) from err
        if existing is None:
            # "mlflow-artifacts:/" + "/name" would name a host ("mlflow-artifacts://name"),
            # which the tracking server refuses: one slash between root and experiment
            root = (self.artifact_root or settings.mlflow_artifact_root()).rstrip("/")
            try:
                experiment_id = mlflow.create_experiment(
                    self.experiment,
                    artifact_location=f"{root}/{self.experiment}",
                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
                )
            except mlflow.exceptions.MlflowException:  # created by a concurrent process
                existing = mlflow.get_experiment_by_name(self.experiment)
            else:
                return experiment_id
        if existing.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # made before the tag
            mlflow.MlflowClient().set_experiment_tag(
                existing.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
            )
        return existing.experiment_id

    def client(self) -> Any:
        """An MlflowClient on our tracking store (registry: aliases, tags)."""
        import mlflow

        self.setup()
        return mlflow.MlflowClient()

    @contextlib.contextmanager
    def run(
        self, spec: RunSpec, *, system_metrics: bool = False, nested: bool = False
    ) -> Iterator[TrackedRun]:
        """Open a run; close it FINISHED on success, KILLED on an interrupt, FAILED on any
        other error. `system_metrics`: MLflow samples CPU/memory/GPU while it is open;
        `nested`: a child of the run open in this process (see TrackedRun.child)."""
        import mlflow

        experiment_id = self.setup()
        active = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=spec.name,
            tags=spec.tags,
            nested=nested,
            log_system_metrics=system_metrics and settings.mlflow_system_metrics(),
        )
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

    def ui_base(self) -> str:
        return (self.ui_url or settings.mlflow_ui_url()).rstrip("/")

    def experiment_url(self, experiment_id: str) -> str:
        return f"{self.ui_base()}/#/experiments/{experiment_id}/runs?{TRAINING_VIEW}"

    def run_url(self, experiment_id: str, run_id: str, tab: str = "") -> str:
        """The run's page (`tab`: model-metrics, system-metrics, artifacts, ...)."""
        path = f"/#/experiments/{experiment_id}/runs/{run_id}" + (f"/{tab}" if tab else "")
        return f"{self.ui_base()}{path}?{TRAINING_VIEW}"

    def compare_url(self, experiment_id: str, run_ids: list[str]) -> str:
        """MLflow's "compare runs" page for these runs."""
        runs = ",".join(f'"{r}"' for r in run_ids)
        return (
            f'{self.ui_base()}/#/compare-runs?runs=[{runs}]&experiments=["{experiment_id}"]'
            f"&{TRAINING_VIEW}"
        )

    def artifact_url(self, run_id: str, path: str) -> str:
        """A run's artifact file as the MLflow UI serves it (an image a page can embed)."""
        from urllib.parse import quote

        return f"{self.ui_base()}/get-artifact?path={quote(path)}&run_uuid={run_id}"

    def model_version_url(self, name: str, version: str) -> str:
        return f"{self.ui_base()}/#/models/{name}/versions/{version}?{TRAINING_VIEW}"


# How MLflow's UI picks its training view (not GenAI traces): MLflow 3.0-3.x read the
# experiment tag `mlflow.experimentKind`; newer 3.x UIs have a GenAI | Model training
# switch that a link sets with the `workflowType` parameter. Both are UI constants.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
TRAINING_VIEW = "workflowType=machine_learning"


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

    @property
    def experiment_id(self) -> str:
        return self.mlflow_run.info.experiment_id

    def _client(self) -> Any:
        import mlflow

        return mlflow.MlflowClient()

    def params(self, values: dict[str, Any]) -> None:
        """Settings and sample sizes: things that do not change during the run."""
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in values.items()]
        for start in range(0, len(params), 100):  # MLflow's batch limit
            self._client().log_batch(self.run_id, params=params[start : start + 100])

    def step(self, key: str, value: float, step: int) -> None:
        """A per-step training metric (batched)."""
        from mlflow.entities import Metric

        self._pending.append(Metric(key, float(value), int(time.time() * 1000), int(step)))
        if len(self._pending) >= self.batch_every:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._client().log_batch(self.run_id, metrics=list(self._pending))
            self._pending.clear()

    def metrics(
        self,
        values: dict[str, float],
        step: int | None = None,
        *,
        model_id: str | None = None,
        dataset: Any | None = None,
    ) -> None:
        """Results. With `model_id` (a logged model) and `dataset` (from `dataset()`) they
        are also the model's evaluation metrics on that dataset in MLflow's model page."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        names = (dataset.name, dataset.digest) if dataset is not None else (None, None)
        metrics = [
            Metric(k, float(v), now, int(step or 0), model_id, names[0], names[1])
            for k, v in values.items()
        ]
        self._client().log_batch(self.run_id, metrics=metrics)

    def tags(self, values: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._client().log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in values.items()])

    def image(
        self,
        image: Any,
        artifact_file: str | None = None,
        *,
        key: str | None = None,
        step: int | None = None,
    ) -> None:
        """A static image file, or (with `key` and `step`) one frame of MLflow's per-step
        image series (the slider in the run's and the experiment's image charts)."""
        if key is not None:
            self._client().log_image(self.run_id, image, key=key, step=int(step or 0))
        else:
            self._client().log_image(self.run_id, image, artifact_file=artifact_file)

    def json(self, data: dict[str, Any], artifact_file: str) -> None:
        self._client().log_dict(self.run_id, data, artifact_file)

    def table(self, data: dict[str, list[Any]], artifact_file: str) -> None:
        """A table MLflow's UI shows as one (the artifact view and the evaluation tab)."""
        self._client().log_table(self.run_id, data, artifact_file)

    def artifacts(self, folder: str | Path, artifact_path: str) -> None:
        self._client().log_artifacts(self.run_id, str(folder), artifact_path=artifact_path)

    def dataset(
        self,
        name: str,
        digest: str,
        source_uri: str,
        context: str,
        profile: dict[str, Any] | None = None,
    ) -> Any:
        """Record a dataset this run used (training, reference, evaluation) by name, content
        hash and where it is stored; returns the MLflow dataset (for `metrics(dataset=)`)."""
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import Dataset, DatasetInput, InputTag

        with warnings.catch_warnings():  # the registry warns that it guessed the source kind
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(source_uri)
        dataset = MetaDataset(source=source, name=name, digest=digest[:36])  # MLflow's limit
        entity = Dataset(
            name=dataset.name,
            digest=dataset.digest,
            source_type=source._get_source_type(),
            source=source.to_json(),
            profile=json.dumps(profile, sort_keys=True) if profile else None,
        )
        context_tag = InputTag("mlflow.data.context", context)
        self._client().log_inputs(self.run_id, datasets=[DatasetInput(entity, [context_tag])])
        return dataset

    def used_model(self, model_id: str) -> None:
        """Record a logged model as an input of this run (an evaluation of that model)."""
        from mlflow.entities import LoggedModelInput

        self._client().log_inputs(self.run_id, models=[LoggedModelInput(model_id)])

    @contextlib.contextmanager
    def child(self, spec: RunSpec) -> Iterator[TrackedRun]:
        """A nested run under this one (MLflow's parent/child runs), closed like any run.
        This run must be the innermost open run of the process."""
        import mlflow

        active = mlflow.active_run()
        if active is None or active.info.run_id != self.run_id:
            raise RuntimeError(f"run {self.run_id} is not the open run: cannot nest under it")
        with self.tracker.run(spec, nested=True) as run:
            yield run

    def register(
        self,
        artifact_path: str,
        name: str,
        tags: dict[str, str] | None = None,
        model_id: str | None = None,
    ) -> str:
        """Register the run's artifact folder (or, with `model_id`, that logged model: then
        `mlflow.pyfunc.load_model("models:/<name>/<version>")` loads it) as a new version
        of model `name`."""
        import mlflow

        client = mlflow.MlflowClient()
        if not client.search_registered_models(filter_string=f"name = '{name}'"):
            with contextlib.suppress(mlflow.exceptions.MlflowException):  # made concurrently
                client.create_registered_model(name)
        source = (
            f"models:/{model_id}"
            if model_id
            else f"{self.mlflow_run.info.artifact_uri}/{artifact_path}"
        )
        version = client.create_model_version(
            name, source, run_id=self.run_id, tags=tags, model_id=model_id
        )
        return str(version.version)

    def log_model(
        self,
        name: str,
        code_path: str | Path,
        artifacts: dict[str, str],
        signature: Any,
        model_config: dict[str, Any],
        params: dict[str, Any] | None = None,
    ) -> str:
        """A logged model (MLflow's "models from code" pyfunc: `code_path` defines it with
        `mlflow.models.set_model`) with its signature, linked to this run; returns its id.
        Requirements are this project (named, not inferred: inference loads the model)."""
        import mlflow

        active = mlflow.active_run()
        if active is None or active.info.run_id != self.run_id:
            raise RuntimeError(f"run {self.run_id} is not the open run: cannot log a model")
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(code_path),
            artifacts=artifacts,
            signature=signature,
            model_config=model_config,
            pip_requirements=[_project_requirement()],
            params={k: str(v) for k, v in (params or {}).items()},
        )
        return str(info.model_id)

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


def _project_requirement() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"mm_pipelines=={version('mm_pipelines')}"
    except PackageNotFoundError:  # running from a source tree
        return "mm_pipelines"
