"""The scale-out configuration under deploy/, checked against the libraries that will read it:
the executors' own config schemas (dagster-k8s, dagster-celery), the Kubernetes API models (the
same validation dagster-k8s applies before it creates a pod), torchrun's own argument parser,
and the code locations loaded as their servers load them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_EXECUTOR = DEPLOY / "k8s" / "executor.yaml"
CELERY_EXECUTOR = DEPLOY / "celery" / "executor.yaml"
# Where the `cluster` image (docker/Dockerfile.gpu) puts deploy/.
IMAGE_DEPLOY_DIR = Path("/opt/lumo/deploy")

dagster_k8s = pytest.importorskip("dagster_k8s", reason="dagster-k8s reads deploy/k8s")
dagster_celery = pytest.importorskip("dagster_celery", reason="dagster-celery reads deploy/celery")


def executor_config(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["execution"]["config"]


def load_definitions(path: Path):
    """`defs` of a code-location file, loaded the way `dagster api grpc --python-file` loads it."""
    spec = importlib.util.spec_from_file_location(f"code_location_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.defs


def gpu_assets() -> set[str]:
    """The ops whose `lumo` process the runner gives GPUs to: the GPU assets' own ops, and for
    tokenized_shards (a graph: plan_units -> tokenize_unit per work unit -> merge_units) its unit op."""
    from lumo_pipeline.assets import STEPS, tokenize_unit

    return {tokenize_unit.name if name == "tokenized_shards" else name for name, step in STEPS.items() if step.gpu}


def asset_job_ops() -> dict:
    """Op name -> op definition, for every op of the code location, those inside a graph-backed
    asset included. The name is what k8s_job_executor's per_step_k8s_config matches: a step's op
    name (an asset's name, `<asset>_<check>` for a check, an op's own name inside a graph)."""
    from dagster import OpDefinition

    from lumo_pipeline.definitions import defs

    graph = defs.resolve_implicit_global_asset_job_def().graph
    nodes = (graph.get_node(handle) for handle in graph.iterate_node_handles())
    return {node.name: node.definition for node in nodes if isinstance(node.definition, OpDefinition)}


def gpu_pool_steps() -> set[str]:
    from lumo_pipeline.runner import GPU_POOL

    return {name for name, op in asset_job_ops().items() if op.pool == GPU_POOL}


def k8s_model(model_class, data: dict):
    from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict

    return k8s_model_from_dict(model_class, k8s_snake_case_dict(model_class, data))


@pytest.mark.parametrize(
    ("path", "executor_name"),
    [(K8S_EXECUTOR, "k8s_job_executor"), (CELERY_EXECUTOR, "celery_executor")],
    ids=["k8s", "celery"],
)
def test_executor_config_passes_the_executors_schema(path: Path, executor_name: str) -> None:
    from dagster._config import validate_config

    executor = getattr(dagster_k8s if executor_name == "k8s_job_executor" else dagster_celery, executor_name)
    result = validate_config(executor.config_schema.config_type, executor_config(path))
    assert result.success, [error.message for error in result.errors or []]


def test_k8s_step_configs_are_valid_kubernetes_objects() -> None:
    from kubernetes.client import V1Container, V1PodSpec

    config = executor_config(K8S_EXECUTOR)
    step_configs = [config["step_k8s_config"], *config["per_step_k8s_config"].values()]
    for step_config in step_configs:
        k8s_model(V1Container, {"name": "step", **step_config.get("container_config", {})})
        k8s_model(V1PodSpec, {"containers": [], **step_config.get("pod_spec_config", {})})


def test_every_gpu_pool_step_and_only_those_get_a_gpu_on_kubernetes() -> None:
    per_step = executor_config(K8S_EXECUTOR)["per_step_k8s_config"]
    assert set(per_step) == gpu_pool_steps()
    for step, step_config in per_step.items():
        limits = step_config["container_config"]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, f"{step} requests no GPU"
    assert "limits" not in executor_config(K8S_EXECUTOR)["step_k8s_config"]["container_config"]["resources"]


@pytest.mark.parametrize(
    ("location", "executor_name"), [("k8s", "lumo_k8s_job_executor"), ("celery", "lumo_celery_executor")]
)
def test_code_location_keeps_lumos_definitions_with_its_executor(location: str, executor_name: str) -> None:
    from lumo_pipeline.definitions import defs as lumo_defs

    defs = load_definitions(DEPLOY / location / "definitions.py")
    assert defs.executor.name == executor_name
    assert set(defs.resolve_all_asset_keys()) == set(lumo_defs.resolve_all_asset_keys())
    assert defs.resolve_asset_graph().asset_check_keys == lumo_defs.resolve_asset_graph().asset_check_keys
    assert {job.name for job in defs.jobs} == {job.name for job in lumo_defs.jobs}
    assert {schedule.name for schedule in defs.schedules} == {schedule.name for schedule in lumo_defs.schedules}
    assert {sensor.name for sensor in defs.sensors} == {sensor.name for sensor in lumo_defs.sensors}
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.executor_def.name == executor_name


def test_helm_values_load_the_k8s_code_location_and_mirror_the_instance_limits() -> None:
    from kubernetes.client import (
        V1EnvVar,
        V1PodSecurityContext,
        V1ResourceRequirements,
        V1Volume,
        V1VolumeMount,
    )

    values = yaml.safe_load((DEPLOY / "k8s" / "values.yaml").read_text())
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    grpc_args = deployment["dagsterApiGrpcArgs"]
    code_file = Path(grpc_args[grpc_args.index("--python-file") + 1])
    assert (DEPLOY / code_file.relative_to(IMAGE_DEPLOY_DIR)).is_file()
    assert deployment["includeConfigInLaunchedRuns"]["enabled"]
    for env_var in deployment["env"]:
        k8s_model(V1EnvVar, env_var)
    volume_names = {k8s_model(V1Volume, volume).name for volume in deployment["volumes"]}
    assert {k8s_model(V1VolumeMount, mount).name for mount in deployment["volumeMounts"]} <= volume_names
    k8s_model(V1PodSecurityContext, deployment["podSecurityContext"])
    k8s_model(V1ResourceRequirements, deployment["resources"])

    instance = yaml.safe_load((ROOT / "docker" / "dagster.yaml").read_text())
    assert values["concurrency"]["pools"]["defaultLimit"] == instance["concurrency"]["pools"]["default_limit"]
    assert values["concurrency"]["pools"]["granularity"] == instance["concurrency"]["pools"]["granularity"]
    assert values["concurrency"]["runs"]["maxConcurrentRuns"] == instance["concurrency"]["runs"]["max_concurrent_runs"]
    assert values["postgresql"]["postgresqlScheme"] == instance["storage"]["postgres"]["postgres_db"]["scheme"]
    assert "postgresqlPassword" not in values["postgresql"], "the password belongs in the Secret"


def test_training_job_is_valid_and_torchrun_spans_all_its_nodes() -> None:
    from kubernetes.client import V1Job, V1Service
    from torch.distributed.run import get_args_parser

    service_doc, job_doc = yaml.safe_load_all((DEPLOY / "k8s" / "train-job.yaml").read_text())
    service = k8s_model(V1Service, service_doc)
    job = k8s_model(V1Job, job_doc)
    assert service.spec.cluster_ip == "None", "the rendezvous host needs a headless Service"
    assert job.spec.template.spec.subdomain == service.metadata.name
    assert job.spec.completion_mode == "Indexed"

    (container,) = job.spec.template.spec.containers
    assert container.command[0] == "torchrun"
    # Kubernetes expands $(NODE_RANK) from the pod's env: the job completion index, 0..nodes-1.
    assert "--node-rank=$(NODE_RANK)" in container.command
    args = get_args_parser().parse_args([arg.replace("$(NODE_RANK)", "0") for arg in container.command[1:]])
    assert int(args.nnodes) == job.spec.completions == job.spec.parallelism
    assert args.master_addr == f"{job.metadata.name}-0.{service.metadata.name}"
    assert int(args.master_port) == service.spec.ports[0].port
    assert [env.name for env in container.env if env.value_from is not None] == ["NODE_RANK"]
    assert args.module and args.training_script == "lumo_core.torchrun_train"
    import lumo_core.torchrun_train

    assert callable(lumo_core.torchrun_train.main)


def test_gpu_steps_hold_a_slot_of_the_gpu_pool() -> None:
    """The pool that docker/dagster.yaml and the Helm values limit (`concurrency.pools`)."""
    assert gpu_assets()
    assert gpu_assets() <= gpu_pool_steps()


def test_gpu_pool_steps_go_to_the_queue_the_gpu_workers_serve() -> None:
    from dagster_celery.tags import DAGSTER_CELERY_QUEUE_TAG

    workers = yaml.safe_load((DEPLOY / "celery" / "compose.yaml").read_text())["services"]
    gpu_command = workers["celery_gpu_worker"]["command"]
    gpu_queue = gpu_command[gpu_command.index("--queue") + 1]
    queued = {name for name, op in asset_job_ops().items() if op.tags.get(DAGSTER_CELERY_QUEUE_TAG) == gpu_queue}
    assert queued == gpu_pool_steps()


def test_celery_redelivers_no_step_that_can_still_be_running() -> None:
    """Issue 22, finding 7: with `task_acks_late` and Redis, a task unacknowledged for the broker's
    visibility timeout (1 h by default) is delivered again while it still runs. The timeout must be
    set, and above the runs' time limit, which bounds every step."""
    config_source = executor_config(CELERY_EXECUTOR)["config_source"]
    assert config_source["task_acks_late"] is True
    visibility_timeout = config_source["broker_transport_options"]["visibility_timeout"]
    run_limit = yaml.safe_load((ROOT / "docker" / "dagster.yaml").read_text())["run_monitoring"]["max_runtime_seconds"]
    assert run_limit > 3600, "the run limit must leave room for real trainings"
    assert visibility_timeout > run_limit


def test_launch_config_cannot_change_the_executors_pods_or_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    """The k8s executor's pod spec (step_k8s_config, per_step_k8s_config, job_image, volumes, env)
    and the Celery executor's broker and worker settings are the code location's: a run config
    that sets any of them is refused before any step runs, rather than silently ignored."""
    from dagster import DagsterInvalidConfigError, validate_run_config

    monkeypatch.setenv("DAGSTER_CELERY_BROKER_URL", "redis://:secret@redis:6379/0")
    monkeypatch.setenv("DAGSTER_CELERY_BACKEND_URL", "redis://:secret@redis:6379/1")
    attempts = {
        "k8s": {"step_k8s_config": {"pod_spec_config": {"volumes": [{"name": "root", "host_path": {"path": "/"}}]}}},
        "celery": {"broker": "redis://elsewhere:6379/0"},
    }
    for location, execution in attempts.items():
        job = load_definitions(DEPLOY / location / "definitions.py").resolve_implicit_global_asset_job_def()
        validate_run_config(job, {})
        with pytest.raises(DagsterInvalidConfigError, match="Received unexpected config entry"):
            validate_run_config(job, {"execution": {"config": execution}})
