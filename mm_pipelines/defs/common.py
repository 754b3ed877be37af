"""What the assets of every group share: the GPU step settings, the retry policy and the
guards that keep a retry from happening where it cannot help (bad input, a full disk, an
interrupt)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import dagster as dg
from dagster._core.errors import DagsterExecutionInterruptedError

from mm_pipelines.defs.k8s import gpu_op_tags
from mm_pipelines.pipeline.faults import InfrastructureError
from mm_pipelines.pipeline.model_store import ArtifactIntegrityError

# retries are for lost GPUs and flaky networks, not for bad input, full disks or interrupts
RETRY = dg.RetryPolicy(max_retries=2, delay=10, backoff=dg.Backoff.EXPONENTIAL)

# a step on the GPU: one at a time through the `gpu` pool (dagster.yaml), on the GPU node pool
# on Kubernetes (op tags from MM_K8S_GPU*), retried like any other step
GPU_STEP: dict[str, Any] = {"pool": "gpu", "op_tags": gpu_op_tags()}

# failure metadata that says "an interrupt ended this step" (cli.run_job stops on it)
INTERRUPTED = "mm.interrupted"


@contextlib.contextmanager
def stop_on_interrupt() -> Iterator[None]:
    """Ctrl-C and SIGTERM stop the run. Dagster hands an interrupt inside a step with a
    RetryPolicy to the policy, which retries it (the training went on after Ctrl-C, and a
    SIGTERM-ed run ended SUCCESS); here it becomes a failure that is never retried, and the
    interrupt is handed back to Dagster so that the run stops at its next step."""
    try:
        yield
    except (KeyboardInterrupt, DagsterExecutionInterruptedError) as err:
        _interrupt_the_run()
        raise dg.Failure(
            description="interrupted (Ctrl-C or SIGTERM): the run stops here, no retry; "
            "checkpoints already written are kept and a new run resumes from them",
            metadata={INTERRUPTED: True},
            allow_retries=False,
        ) from err


def _interrupt_the_run() -> None:
    """Mark the interrupt as pending again, as Dagster's own signal handler does between
    steps: the next step boundary of this process raises it and the run ends. (Private
    state: Dagster has no public call for it; without it an in-process run would go on
    with its other steps.)"""
    from dagster._utils import interrupts

    interrupts._received_interrupt["received"] = True


@contextlib.contextmanager
def no_retry_on_bad_input() -> Iterator[None]:
    """Errors of configuration or input fail at once: retrying would only repeat them
    (with a fresh MLflow run each). So do a full or read-only disk and interrupts."""
    with stop_on_interrupt():
        try:
            yield
        except (
            ValueError,
            TypeError,
            KeyError,
            FileNotFoundError,
            ArtifactIntegrityError,
        ) as err:
            raise dg.Failure(
                description=f"{type(err).__name__}: {err}", allow_retries=False
            ) from err
        except InfrastructureError as err:
            if err.retriable:
                raise
            raise dg.Failure(description=str(err), allow_retries=False) from err


def was_interrupted(events: list[Any]) -> bool:
    """Whether one of a run's STEP_FAILURE events came from an interrupt."""
    for event in events:
        if event.event_type_value != "STEP_FAILURE":
            continue
        data = event.step_failure_data
        user = data.user_failure_data
        source = getattr(data.error_source, "name", None)
        if source == "INTERRUPT" or (user is not None and INTERRUPTED in user.metadata):
            return True
    return False
