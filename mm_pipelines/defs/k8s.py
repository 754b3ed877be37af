"""Kubernetes placement of GPU steps, emitted as `dagster-k8s/config` op tags.

On Kubernetes with the `k8s_job_executor`, every step is its own pod and dagster-k8s reads
the step's `dagster-k8s/config` tag to shape that pod. The GPU-heavy assets carry
`op_tags=gpu_op_tags()`: on a laptop (no `MM_K8S_GPUS`) that is `{}` and nothing changes;
in production the same code asks for GPUs and lands on the GPU node pool.

| variable | default | meaning |
|---|---|---|
| `MM_K8S_GPUS` | `0` | `nvidia.com/gpu` limit of a GPU step; 0 = no GPU tags at all |
| `MM_K8S_GPU_NODE_SELECTOR` | `{}` | JSON object, e.g. `{"nvidia.com/gpu.present": "true"}` |
| `MM_K8S_GPU_TOLERATIONS` | tolerate the `nvidia.com/gpu` taint | JSON list of tolerations |
| `MM_K8S_GPU_CPU_REQUEST`, `MM_K8S_GPU_CPU_LIMIT` | unset | CPU of a GPU step, e.g. `4` |
| `MM_K8S_GPU_MEMORY_REQUEST`, `MM_K8S_GPU_MEMORY_LIMIT` | unset | memory, e.g. `24Gi` |

The tags are fixed when the code location loads (op tags are part of the definitions), so
they come from the environment of the user-code deployment, like every other setting here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mm_pipelines import settings

K8S_CONFIG_TAG = "dagster-k8s/config"
GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_GPU_TOLERATIONS = tuple(settings.DEFAULT_GPU_TOLERATIONS)


@dataclass(frozen=True)
class K8sGpuCompute:
    """What one GPU step asks of Kubernetes. Quantities are Kubernetes strings ("4", "24Gi")."""

    gpus: int = 0
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: Sequence[Mapping[str, Any]] = ()
    cpu_request: str | None = None
    cpu_limit: str | None = None
    memory_request: str | None = None
    memory_limit: str | None = None


def _quantities(cpu: str | None, memory: str | None) -> dict[str, str]:
    return {k: v for k, v in (("cpu", cpu), ("memory", memory)) if v}


def k8s_gpu_tags(compute: K8sGpuCompute) -> dict[str, Any]:
    """The op tags for a GPU step: `{}` without GPUs, else one `dagster-k8s/config` tag with
    the GPU limit, CPU/memory requests and limits, node selector and tolerations."""
    if compute.gpus < 0:
        raise ValueError(f"gpus must be >= 0, got {compute.gpus}")
    if compute.gpus == 0:  # CPU-only: the run launcher's defaults place the pod
        return {}
    # extended resources such as GPUs are set as limits only; Kubernetes copies them to requests
    limits = _quantities(compute.cpu_limit, compute.memory_limit)
    resources: dict[str, Any] = {"limits": {**limits, GPU_RESOURCE: str(compute.gpus)}}
    requests = _quantities(compute.cpu_request, compute.memory_request)
    if requests:
        resources["requests"] = requests
    pod_spec: dict[str, Any] = {"tolerations": [dict(t) for t in compute.tolerations]}
    if compute.node_selector:
        pod_spec["node_selector"] = dict(compute.node_selector)
    config = {"container_config": {"resources": resources}, "pod_spec_config": pod_spec}
    return {K8S_CONFIG_TAG: config}


def gpu_compute_from_env() -> K8sGpuCompute:
    """The `MM_K8S_GPU*` settings (see the module doc); none set -> 0 GPUs."""
    return K8sGpuCompute(**settings.k8s_gpu())


def gpu_op_tags() -> dict[str, Any]:
    """Op tags for the GPU assets (`op_tags=gpu_op_tags()`), from the environment."""
    return k8s_gpu_tags(gpu_compute_from_env())


def executor_from_env() -> Any:
    """The Definitions' executor: `k8s_job_executor` (one pod per step) when
    `MM_EXECUTOR=k8s`, else Dagster's default (`multi_or_in_process_executor`).

    The import is lazy so a laptop never loads the Kubernetes client."""
    import dagster as dg

    if settings.executor() != "k8s":
        return dg.multi_or_in_process_executor
    from dagster_k8s import k8s_job_executor

    return k8s_job_executor
