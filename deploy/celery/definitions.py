"""Lumo's code location on Celery: lumo_pipeline's definitions, each step a Celery task.

The `lumo_code` service of deploy/celery/compose.yaml loads this file. Only the executor differs
from `lumo_pipeline.definitions`: dagster-celery's `celery_executor`, configured by executor.yaml
beside this file (broker and backend from the environment).
"""

from pathlib import Path

import yaml
from dagster_celery import celery_executor

from lumo_pipeline.definitions import build_definitions
from lumo_pipeline.resources import LumoSettings
from lumo_pipeline.runner import LumoRunner

EXECUTOR_CONFIG = yaml.safe_load(Path(__file__).with_name("executor.yaml").read_text())["execution"]["config"]

defs = build_definitions(
    LumoSettings.from_environment(),
    LumoRunner.from_environment(),
    executor=celery_executor.configured(lambda _: EXECUTOR_CONFIG, name="lumo_celery_executor", config_schema={}),
)
