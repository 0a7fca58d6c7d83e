"""Lumo's code location on Kubernetes: lumo_pipeline's definitions, each step in its own pod.

The code server of deploy/k8s/values.yaml loads this file (`dagster api grpc --python-file`). Only
the executor differs from `lumo_pipeline.definitions`: dagster-k8s's `k8s_job_executor`,
configured by executor.yaml beside this file (per-step resources, GPU steps on GPU nodes).
"""

from pathlib import Path

import yaml
from dagster import Definitions
from dagster_k8s import k8s_job_executor

from lumo_pipeline.definitions import defs as lumo_defs

EXECUTOR_CONFIG = yaml.safe_load(Path(__file__).with_name("executor.yaml").read_text())["execution"]["config"]

defs = Definitions(
    assets=lumo_defs.assets,
    asset_checks=lumo_defs.asset_checks,
    jobs=lumo_defs.jobs,
    schedules=lumo_defs.schedules,
    sensors=lumo_defs.sensors,
    resources=lumo_defs.resources,
    executor=k8s_job_executor.configured(EXECUTOR_CONFIG, name="lumo_k8s_job_executor"),
)
