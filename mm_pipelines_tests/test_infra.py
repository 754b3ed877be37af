"""The production deployment files and the GPU placement tags, checked with the real parsers:
dagster-k8s's own tag parser and Job builder, Dagster's instance-config schema, the
K8sRunLauncher's config schema, `docker compose config` where the compose plugin exists."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from dagster._config import validate_config
from dagster._core.instance.config import dagster_instance_config
from dagster_k8s import K8sRunLauncher
from dagster_k8s.job import (
    DagsterK8sJobConfig,
    UserDefinedDagsterK8sConfig,
    construct_dagster_k8s_job,
    get_user_defined_k8s_config,
)

from mm_pipelines.defs.k8s import (
    GPU_RESOURCE,
    K8S_CONFIG_TAG,
    K8sGpuCompute,
    executor_from_env,
    gpu_op_tags,
    k8s_gpu_tags,
)

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
K8S_ENV = [
    "MM_K8S_GPUS",
    "MM_K8S_GPU_NODE_SELECTOR",
    "MM_K8S_GPU_TOLERATIONS",
    "MM_K8S_GPU_CPU_REQUEST",
    "MM_K8S_GPU_CPU_LIMIT",
    "MM_K8S_GPU_MEMORY_REQUEST",
    "MM_K8S_GPU_MEMORY_LIMIT",
]


def _step_pod_spec(op_tags: dict[str, Any]) -> Any:
    """The pod spec dagster-k8s builds for a step of an asset with these op tags: the tags go
    through Dagster's tag normalization (as on a real asset), then dagster-k8s's parser and
    its Job builder, which validates every key against the Kubernetes models."""

    @dg.asset(op_tags=op_tags)
    def gpu_step() -> None: ...

    tags = gpu_step.op.tags  # normalized: every value a string, as the executor sees them
    user_config = get_user_defined_k8s_config(tags)
    job = construct_dagster_k8s_job(
        DagsterK8sJobConfig(job_image="registry.example.com/mm-pipelines:test"),
        args=["dagster", "api", "execute_step"],
        job_name="dagster-step-test",
        user_defined_k8s_config=user_config,
    )
    return job.spec.template.spec


@pytest.fixture
def no_k8s_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in K8S_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# ---------------------------------------------------------------- GPU tags


def test_gpu_tags_parse_into_a_pod_spec_with_gpu_selector_and_tolerations() -> None:
    compute = K8sGpuCompute(
        gpus=2,
        node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        cpu_request="4",
        memory_request="16Gi",
        memory_limit="32Gi",
    )
    spec = _step_pod_spec(k8s_gpu_tags(compute))
    container = spec.containers[0]
    assert container.resources.limits == {GPU_RESOURCE: "2", "memory": "32Gi"}
    assert container.resources.requests == {"cpu": "4", "memory": "16Gi"}
    assert spec.node_selector == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert [(t.key, t.operator, t.effect) for t in spec.tolerations] == [
        ("nvidia.com/gpu", "Exists", "NoSchedule")
    ]


def test_cpu_only_gives_no_gpu_tags(no_k8s_env: pytest.MonkeyPatch) -> None:
    assert k8s_gpu_tags(K8sGpuCompute(gpus=0, node_selector={"a": "b"})) == {}
    assert gpu_op_tags() == {}  # a laptop: no MM_K8S_* variables
    spec = _step_pod_spec(gpu_op_tags())
    limits = spec.containers[0].resources.limits if spec.containers[0].resources else None
    assert not limits or GPU_RESOURCE not in limits
    assert spec.node_selector is None and spec.tolerations is None


def test_gpu_op_tags_from_environment(no_k8s_env: pytest.MonkeyPatch) -> None:
    no_k8s_env.setenv("MM_K8S_GPUS", "1")
    no_k8s_env.setenv("MM_K8S_GPU_NODE_SELECTOR", '{"pool": "gpu"}')
    tags = gpu_op_tags()
    config = tags[K8S_CONFIG_TAG]
    # without MM_K8S_GPU_TOLERATIONS the usual nvidia.com/gpu taint is tolerated
    assert config["pod_spec_config"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    spec = _step_pod_spec(tags)
    assert spec.containers[0].resources.limits == {GPU_RESOURCE: "1"}
    assert spec.node_selector == {"pool": "gpu"}


def test_gpu_op_tags_reject_malformed_json(no_k8s_env: pytest.MonkeyPatch) -> None:
    no_k8s_env.setenv("MM_K8S_GPUS", "1")
    no_k8s_env.setenv("MM_K8S_GPU_TOLERATIONS", '{"key": "not a list"}')
    with pytest.raises(ValueError, match="MM_K8S_GPU_TOLERATIONS"):
        gpu_op_tags()
    no_k8s_env.setenv("MM_K8S_GPU_TOLERATIONS", "[")
    with pytest.raises(ValueError, match="JSON"):
        gpu_op_tags()


def test_executor_follows_mm_executor(monkeypatch: pytest.MonkeyPatch) -> None:
    from dagster_k8s import k8s_job_executor

    monkeypatch.delenv("MM_EXECUTOR", raising=False)
    assert executor_from_env() is dg.multi_or_in_process_executor
    monkeypatch.setenv("MM_EXECUTOR", "k8s")
    assert executor_from_env() is k8s_job_executor


# ---------------------------------------------------------------- Dockerfile vs Makefile


def _uv_install_tokens(command: str, bin_ref: str) -> list[str]:
    """The `uv pip install` command with the venv's bin dir spelled `BIN` and BuildKit's
    `--mount` options (build cache only) removed."""
    tokens = shlex.split(command.replace(bin_ref, "BIN"))
    tokens = [t for t in tokens if not t.startswith("--mount=")]
    start = next(i for i, t in enumerate(tokens) if t.endswith("/uv") or t == "uv")
    return tokens[start:]


def _makefile_uv_install() -> str:
    lines = (REPO / "Makefile").read_text().splitlines()
    return next(line.strip() for line in lines if "uv pip install" in line and "-r " in line)


def _dockerfile_runs() -> list[str]:
    """Every RUN instruction, continuation lines joined."""
    text = (INFRA / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.strip()[4:] for line in text.splitlines() if line.strip().startswith("RUN ")]


def test_dockerfile_installs_python_packages_exactly_like_the_makefile() -> None:
    make = _uv_install_tokens(_makefile_uv_install(), "$(BIN)")
    docker = [r for r in _dockerfile_runs() if "uv pip install" in r]
    assert len(docker) == 1, docker
    assert _uv_install_tokens(docker[0], "${BIN}") == make
    assert make[:3] == ["BIN/uv", "pip", "install"] and "requirements.lock" in make
    # and uv itself comes into the venv the same way
    make_uv = next(
        ln
        for ln in (REPO / "Makefile").read_text().splitlines()
        if "install" in ln and "-m pip" in ln
    )
    docker_uv = next(r for r in _dockerfile_runs() if "-m pip install" in r)
    assert shlex.split(docker_uv.replace("${BIN}", "BIN")) == shlex.split(
        make_uv.strip().replace("$(BIN)", "BIN")
    )


def test_dockerfile_base_user_and_entrypoint() -> None:
    text = (INFRA / "Dockerfile").read_text().replace("\\\n", " ")
    base = re.search(r"^FROM\s+(\S+)\s*$", text, re.M).group(1)
    repo, _, tag = base.partition(":")
    assert repo == "nvidia/cuda" and tag and "latest" not in tag and "runtime" in tag
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert "COPY pyproject.toml requirements.lock" in text
    cmd = json.loads(re.search(r"^CMD\s+(\[.*?\])\s*$", text, re.M).group(1))
    assert cmd[:3] == ["dagster", "code-server", "start"] and "mm_pipelines.defs" in cmd
    # Kubernetes sets only `args` on run/step pods: the entrypoint must pass them through
    entry = json.loads(re.search(r"^ENTRYPOINT\s+(\[.*?\])", text, re.M).group(1))
    assert entry == ["/usr/bin/tini", "--"]


def test_lock_has_the_packages_the_production_instance_loads() -> None:
    """Run and step pods load the instance (dagster-postgres storage, K8sRunLauncher) from the
    image, which installs exactly requirements.lock."""
    pinned = {
        line.split("==")[0].strip().lower()
        for line in (REPO / "requirements.lock").read_text().splitlines()
        if "==" in line and not line.startswith((" ", "#"))
    }
    missing = {"dagster-k8s", "dagster-postgres", "dagster-webserver"} - pinned
    assert not missing, f"add {sorted(missing)} to pyproject.toml and run `make lock`"


# ---------------------------------------------------------------- Dagster instance files


@pytest.fixture
def pg_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "DAGSTER_PG_HOST": "db",
        "DAGSTER_PG_USERNAME": "dagster",
        "DAGSTER_PG_PASSWORD": "x",
        "DAGSTER_PG_DB": "dagster",
    }.items():
        monkeypatch.setenv(name, value)


def test_k8s_instance_config_is_valid(pg_env: None) -> None:
    config, _ = dagster_instance_config(str(INFRA), "dagster-k8s.yaml")
    assert "postgres" in config["storage"]
    assert config["concurrency"]["pools"]["default_limit"] >= 1
    launcher = config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    result = validate_config(K8sRunLauncher.config_type(), launcher["config"])
    assert result.success, result.errors
    # the per-run Kubernetes config must be valid Kubernetes (dagster-k8s checks the keys)
    UserDefinedDagsterK8sConfig.from_dict(launcher["config"]["run_k8s_config"])


def test_compose_instance_config_is_valid(pg_env: None) -> None:
    config, _ = dagster_instance_config(str(INFRA / "compose"), "dagster.yaml")
    assert "postgres" in config["storage"]
    assert config["concurrency"]["pools"]["default_limit"] == 1
    workspace = yaml.safe_load((INFRA / "compose" / "workspace.yaml").read_text())
    assert workspace["load_from"][0]["grpc_server"]["host"] == "user_code"


# ---------------------------------------------------------------- docker-compose


def _env_names_read_by_our_code() -> set[str]:
    """Environment variables that mm_pipelines reads (settings.env, os.environ, EnvVar)."""
    pattern = re.compile(
        r"(?:\benv|_json_env|environ\.get|getenv|EnvVar)\(\s*[\"']([A-Z][A-Z0-9_]*)[\"']"
        r"|environ\[\s*[\"']([A-Z][A-Z0-9_]*)[\"']"
    )
    names: set[str] = set()
    for path in (REPO / "mm_pipelines").rglob("*.py"):
        for match in pattern.finditer(path.read_text(encoding="utf-8")):
            names.add(match.group(1) or match.group(2))
    return names


def _instance_env_refs(path: Path) -> set[str]:
    """`env: NAME` references of a Dagster instance file."""
    return set(re.findall(r"^\s*env:\s*([A-Z][A-Z0-9_]*)\s*$", path.read_text(), re.M))


def _mlflow_env_names() -> set[str]:
    spec = importlib.util.find_spec("mlflow")
    source = Path(spec.origin).parent / "environment_variables.py"
    return set(re.findall(r"[\"'](MLFLOW_[A-Z0-9_]+)[\"']", source.read_text()))


# read by boto3 / Dagster itself rather than by our code
STANDARD_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "DAGSTER_HOME"}
OUR_SERVICES = {"user_code", "webserver", "daemon", "serving"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def test_compose_file_parses(compose: dict[str, Any], tmp_path: Path) -> None:
    has_plugin = (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    )
    if has_plugin:  # the reference parser: needs no engine
        out = subprocess.run(
            ["docker", "compose", "-f", str(INFRA / "docker-compose.yml"), "config", "-q"],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
    assert set(compose["services"]) == {
        "postgres",
        "minio",
        "minio_init",
        "mlflow",
        "user_code",
        "webserver",
        "daemon",
        "serving",
    }
    named_volumes = set(compose["volumes"])
    for name, service in compose["services"].items():
        for dep in service.get("depends_on", {}):
            assert dep in compose["services"], (name, dep)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith("."):
                assert source in named_volumes, (name, source)
            else:  # bind mounts of files that must exist in the repo
                assert (INFRA / source).exists(), (name, source)


def test_compose_images_are_pinned(compose: dict[str, Any]) -> None:
    images = {name: s["image"] for name, s in compose["services"].items()}
    assert images["postgres"].startswith("pgvector/pgvector:")
    assert images["minio"].startswith(("minio/minio:", "quay.io/minio/minio:"))
    for name, image in images.items():
        if name in OUR_SERVICES | {"mlflow"}:
            assert compose["services"][name]["build"]["dockerfile"] == "infra/Dockerfile"
            continue
        tag = image.rsplit(":", 1)[-1]
        assert ":" in image and tag != "latest", (name, image)


def test_compose_env_vars_are_ones_something_reads(compose: dict[str, Any]) -> None:
    ours = _env_names_read_by_our_code()
    instance = _instance_env_refs(INFRA / "compose" / "dagster.yaml")
    required = {
        "MM_PG_DSN",
        "MM_S3_BUCKET",
        "MM_S3_ENDPOINT_URL",
        "MM_S3_MODELS_PREFIX",
        "MM_SUBJECTS",
        "MLFLOW_TRACKING_URI",
        "MM_LANDING",
    }
    for name in OUR_SERVICES:
        env = set(compose["services"][name]["environment"])
        assert required <= env, (name, required - env)
        unknown = env - ours - instance - STANDARD_ENV
        assert not unknown, f"{name}: nothing reads {sorted(unknown)}"
    assert instance <= set(compose["services"]["daemon"]["environment"])
    mlflow_env = set(compose["services"]["mlflow"]["environment"])
    assert mlflow_env - STANDARD_ENV <= _mlflow_env_names()
    # every ${VAR} has a default, so the file works without an .env file
    text = (INFRA / "docker-compose.yml").read_text()
    bare = [m for m in re.findall(r"(?<!\$)\$\{([^}]*)\}", text) if ":-" not in m]
    assert not bare, bare


def test_compose_services_share_no_volume_only_read_only_configuration(
    compose: dict[str, Any],
) -> None:
    """Steps hand each other artifacts through S3 (the model store), never through a disk."""
    for name in OUR_SERVICES:
        for volume in compose["services"][name].get("volumes", []):
            source, _target, mode = volume.split(":")
            assert source.startswith("./") and mode == "ro", (name, volume)
            assert (INFRA / source).is_file(), (name, volume)


# ---------------------------------------------------------------- Helm values

# Keys of the official Dagster chart we rely on, as documented by its values.yaml and
# values.schema.json (https://github.com/dagster-io/dagster/blob/1.13.27/helm/dagster/values.yaml,
# generated from helm/dagster/schema/schema/charts/dagster/values.py and subschema/*.py).
# The chart cannot be fetched from a registry here, so this is the list we check against:
# a dict is a documented mapping, "*" a free-form value (Kubernetes objects, env maps),
# a one-element list a list of items of that shape.
_K8S = "*"
_ENV_FROM = [{"name": "*"}]
_DOCUMENTED: dict[str, Any] = {
    "global": {
        "postgresqlSecretName": "*",
        "dagsterHome": "*",
        "serviceAccountName": "*",
        "celeryConfigSecretName": "*",
        "dagsterInstanceConfigMap": "*",
    },
    "dagsterWebserver": {
        "replicaCount": "*",
        "image": _K8S,
        "nameOverride": "*",
        "pathPrefix": "*",
        "service": _K8S,
        "workspace": "*",
        "env": "*",
        "envConfigMaps": _ENV_FROM,
        "envSecrets": _ENV_FROM,
        "deploymentLabels": "*",
        "labels": "*",
        "nodeSelector": _K8S,
        "affinity": _K8S,
        "tolerations": _K8S,
        "podSecurityContext": _K8S,
        "securityContext": _K8S,
        "resources": _K8S,
        "readinessProbe": _K8S,
        "livenessProbe": _K8S,
        "startupProbe": _K8S,
        "annotations": "*",
        "enableReadOnly": "*",
        "dbStatementTimeout": "*",
        "dbPoolRecycle": "*",
        "logLevel": "*",
        "schedulerName": "*",
        "volumeMounts": _K8S,
        "volumes": _K8S,
    },
    "dagster-user-deployments": {
        "enabled": "*",
        "enableSubchart": "*",
        "imagePullSecrets": _K8S,
        "deployments": [
            {
                "name": "*",
                "image": {"repository": "*", "tag": "*", "pullPolicy": "*"},
                "port": "*",
                "dagsterApiGrpcArgs": "*",
                "codeServerArgs": "*",
                "includeConfigInLaunchedRuns": {"enabled": "*"},
                "env": "*",
                "envConfigMaps": _ENV_FROM,
                "envSecrets": _ENV_FROM,
                "annotations": "*",
                "nodeSelector": _K8S,
                "affinity": _K8S,
                "tolerations": _K8S,
                "podSecurityContext": _K8S,
                "securityContext": _K8S,
                "resources": _K8S,
                "livenessProbe": _K8S,
                "readinessProbe": _K8S,
                "startupProbe": _K8S,
                "labels": "*",
                "volumeMounts": _K8S,
                "volumes": _K8S,
                "schedulerName": "*",
            }
        ],
    },
    "runLauncher": {
        "type": "*",
        "config": {
            "k8sRunLauncher": {
                "image": _K8S,
                "imagePullPolicy": "*",
                "jobNamespace": "*",
                "loadInclusterConfig": "*",
                "kubeconfigFile": "*",
                "envConfigMaps": _ENV_FROM,
                "envSecrets": _ENV_FROM,
                "envVars": "*",
                "volumeMounts": _K8S,
                "volumes": _K8S,
                "labels": "*",
                "failPodOnRunFailure": "*",
                "resources": _K8S,
                "schedulerName": "*",
                "securityContext": _K8S,
                "runK8sConfig": {
                    "containerConfig": _K8S,
                    "podSpecConfig": _K8S,
                    "podTemplateSpecMetadata": _K8S,
                    "jobSpecConfig": _K8S,
                    "jobMetadata": _K8S,
                },
            },
        },
    },
    "postgresql": {
        "enabled": "*",
        "image": _K8S,
        "postgresqlScheme": "*",
        "postgresqlHost": "*",
        "postgresqlUsername": "*",
        "postgresqlPassword": "*",
        "postgresqlDatabase": "*",
        "postgresqlParams": "*",
        "service": {"port": "*"},
    },
    "generatePostgresqlPasswordSecret": "*",
    "dagsterDaemon": {
        "enabled": "*",
        "image": _K8S,
        "heartbeatTolerance": "*",
        "env": "*",
        "envConfigMaps": _ENV_FROM,
        "envSecrets": _ENV_FROM,
        "deploymentLabels": "*",
        "labels": "*",
        "nodeSelector": _K8S,
        "affinity": _K8S,
        "tolerations": _K8S,
        "podSecurityContext": _K8S,
        "securityContext": _K8S,
        "resources": _K8S,
        "livenessProbe": _K8S,
        "readinessProbe": _K8S,
        "startupProbe": _K8S,
        "annotations": "*",
        "schedulerName": "*",
        "volumeMounts": _K8S,
        "volumes": _K8S,
        "runCoordinator": {
            "enabled": "*",
            "type": "*",
            "config": {"queuedRunCoordinator": "*", "customRunCoordinator": "*"},
        },
        "runMonitoring": {
            "enabled": "*",
            "startTimeoutSeconds": "*",
            "cancelTimeoutSeconds": "*",
            "maxRuntimeSeconds": "*",
            "pollIntervalSeconds": "*",
            "maxResumeRunAttempts": "*",
            "freeSlotsAfterRunEndSeconds": "*",
        },
        "runRetries": {"enabled": "*", "maxRetries": "*", "retryOnAssetOrOpFailure": "*"},
        "sensors": "*",
        "schedules": "*",
    },
    # subschema/concurrency.py: rendered into the instance's `concurrency:` block
    "concurrency": {
        "enabled": "*",
        "pools": {"defaultLimit": "*", "granularity": "*", "opGranularityRunBuffer": "*"},
        "runs": {
            "maxConcurrentRuns": "*",
            "tagConcurrencyLimits": [{"key": "*", "value": "*", "limit": "*"}],
        },
    },
    "telemetry": {"enabled": "*"},
}


def _undocumented(values: Any, documented: Any, path: str) -> list[str]:
    if documented == "*":
        return []
    if isinstance(documented, list):
        assert isinstance(values, list), path
        return [
            p for i, v in enumerate(values) for p in _undocumented(v, documented[0], f"{path}[{i}]")
        ]
    assert isinstance(values, dict), path
    found = []
    for key, value in values.items():
        if key not in documented:
            found.append(f"{path}.{key}")
        else:
            found.extend(_undocumented(value, documented[key], f"{path}.{key}"))
    return found


@pytest.fixture(scope="module")
def helm_values() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "helm" / "values.yaml").read_text())


def test_helm_values_use_only_documented_chart_keys(helm_values: dict[str, Any]) -> None:
    assert _undocumented(helm_values, _DOCUMENTED, "") == []
    assert helm_values["runLauncher"]["type"] == "K8sRunLauncher"
    assert helm_values["postgresql"]["enabled"] is False
    deployment = helm_values["dagster-user-deployments"]["deployments"][0]
    assert deployment["codeServerArgs"] == ["-m", "mm_pipelines.defs", "-a", "defs"]
    # limits belong to exactly one place: Dagster rejects an instance with both
    queued = helm_values["dagsterDaemon"]["runCoordinator"].get("config", {})
    assert not queued or not queued.get("queuedRunCoordinator")


def test_helm_kubernetes_snippets_are_valid_kubernetes(
    helm_values: dict[str, Any], no_k8s_env: pytest.MonkeyPatch
) -> None:
    run_config = helm_values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]
    # dagster-k8s converts the chart's camelCase keys and validates them against the models
    UserDefinedDagsterK8sConfig(
        **{re.sub(r"[A-Z]", lambda m: "_" + m.group().lower(), k): v for k, v in run_config.items()}
    )
    # the GPU settings of the user deployment make a valid GPU step pod
    deployment = helm_values["dagster-user-deployments"]["deployments"][0]
    for item in deployment["env"]:
        no_k8s_env.setenv(item["name"], item["value"])
    spec = _step_pod_spec(gpu_op_tags())
    assert spec.containers[0].resources.limits[GPU_RESOURCE] == "1"
    assert spec.node_selector and spec.tolerations


def test_the_serving_deployment_runs_mm_serve_with_a_readiness_probe_on_healthz() -> None:
    from kubernetes.client import ApiClient, V1Deployment, V1Service

    docs = list(yaml.safe_load_all((INFRA / "k8s" / "serving.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Deployment", "Service"}

    class _Response:  # ApiClient.deserialize reads .data: typed models check every field
        def __init__(self, doc: dict) -> None:
            self.data = json.dumps(doc)

    api = ApiClient()
    deployment = api.deserialize(_Response(kinds["Deployment"]), V1Deployment)
    api.deserialize(_Response(kinds["Service"]), V1Service)
    (container,) = deployment.spec.template.spec.containers
    assert container.command[:2] == ["mm", "serve"]
    assert container.readiness_probe.http_get.path == "/healthz"
    assert container.liveness_probe.http_get is None  # /healthz is 503 before a bundle exists
    assert not container.image.endswith(":latest")
    env = {e.name for e in container.env}
    assert env <= _env_names_read_by_our_code() | STANDARD_ENV


def test_helm_pods_mount_only_configuration_and_get_env_our_code_reads(
    helm_values: dict[str, Any],
) -> None:
    deployment = helm_values["dagster-user-deployments"]["deployments"][0]
    launcher = helm_values["runLauncher"]["config"]["k8sRunLauncher"]
    for where in (deployment, launcher):  # the code server; run and step pods
        assert all(set(v) == {"name", "configMap"} for v in where["volumes"]), where["volumes"]
        assert all(m["readOnly"] is True for m in where["volumeMounts"])
    env = {item["name"] for item in deployment["env"]}
    assert {"MM_S3_MODELS_PREFIX", "MM_SUBJECTS"} <= env
    assert env <= _env_names_read_by_our_code() | STANDARD_ENV, env - _env_names_read_by_our_code()
