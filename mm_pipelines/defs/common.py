"""What the assets of every group share: the GPU step settings, the retry policy and the
no-retry guard for bad input."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import dagster as dg

from mm_pipelines.defs.k8s import gpu_op_tags
from mm_pipelines.pipeline.model_store import ArtifactIntegrityError

# retries are for preempted pods, lost GPUs and flaky networks, not for bad input
RETRY = dg.RetryPolicy(max_retries=2, delay=10, backoff=dg.Backoff.EXPONENTIAL)

# a step on the GPU: one at a time through the `gpu` pool (dagster.yaml), on the GPU node pool
# on Kubernetes (op tags from MM_K8S_GPU*), retried like any other step
GPU_STEP: dict[str, Any] = {"pool": "gpu", "op_tags": gpu_op_tags()}


@contextlib.contextmanager
def no_retry_on_bad_input() -> Iterator[None]:
    """Errors of configuration or input fail at once: retrying would only repeat them
    (with a fresh MLflow run each)."""
    try:
        yield
    except (ValueError, TypeError, KeyError, FileNotFoundError, ArtifactIntegrityError) as err:
        raise dg.Failure(description=f"{type(err).__name__}: {err}", allow_retries=False) from err
