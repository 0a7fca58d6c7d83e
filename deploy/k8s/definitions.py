"""Lumo's code location on Kubernetes: lumo_pipeline's definitions, each step in its own pod.

The code server of deploy/k8s/values.yaml loads this file (`dagster api grpc --python-file`). Only
the executor differs from `lumo_pipeline.definitions`: dagster-k8s's `k8s_job_executor`,
configured by executor.yaml beside this file (per-step resources, GPU steps on GPU nodes).

The executor's config is fixed here (`configured` with an empty config schema): a run config that
sets `execution.config` is refused by Dagster before any step runs (without a schema, `configured`
accepted any such config and silently ignored it). The runner and settings come from the code location's environment, as in
lumo_pipeline.definitions (docs/security.md).
"""

from pathlib import Path

import yaml
from dagster_k8s import k8s_job_executor

from lumo_pipeline.definitions import build_definitions
from lumo_pipeline.resources import LumoSettings
from lumo_pipeline.runner import LumoRunner

EXECUTOR_CONFIG = yaml.safe_load(Path(__file__).with_name("executor.yaml").read_text())["execution"]["config"]

defs = build_definitions(
    LumoSettings.from_environment(),
    LumoRunner.from_environment(),
    executor=k8s_job_executor.configured(lambda _: EXECUTOR_CONFIG, name="lumo_k8s_job_executor", config_schema={}),
)
