"""Lumo's code location on Celery: lumo_pipeline's definitions, each step a Celery task.

The `lumo_code` service of deploy/celery/compose.yaml loads this file. Only the executor differs
from `lumo_pipeline.definitions`: dagster-celery's `celery_executor`, configured by executor.yaml
beside this file (broker and backend from the environment).

The executor's config is fixed here (`configured` with an empty config schema): a run config that
sets `execution.config` is refused by Dagster before any step runs (without a schema, `configured`
accepted any such config and silently ignored it). The runner and settings come from the code location's environment, as in
lumo_pipeline.definitions (docs/security.md).
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
