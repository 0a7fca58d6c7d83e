"""The Dagster code location: `defs` for `dagster dev` and `dagster asset materialize -m lumo_pipeline`.

Loading this module stays light (no torch, transformers or diffusers): only the `lumo` processes
that the steps and the model-loading checks start through Pipes import them.

The executor runs the steps of `tokenized_shards`' unit fan-out too (lumo_pipeline.assets): in
process one unit after another; with multiprocess_executor, celery_executor or k8s_job_executor
(deploy/) units side by side, as many at once as the `gpu` pool has slots.

Executor: in-process. The default multiprocess executor starts one Python per step, and each
re-imports Dagster and this code location; the heavy work already runs in its own `lumo` process
through Pipes. Measured on the 2-core development machine, `--select token_space,manifest_audit`
(3 steps): in-process 33-42 s wall, 27-28 s CPU; multiprocess 51-64 s wall, 40-43 s CPU.
"""

from __future__ import annotations

from dagster import Definitions, ExecutorDefinition, in_process_executor

from lumo_pipeline.assets import LUMO_ASSETS
from lumo_pipeline.checks import LUMO_CHECKS
from lumo_pipeline.inputs import INPUT_ASSETS, inputs_observed
from lumo_pipeline.io_managers import io_manager_resources
from lumo_pipeline.jobs import (
    manifest_changed,
    nightly_reaudit,
    reaudit_job,
    tokenization_job,
)
from lumo_pipeline.resources import LumoSettings, fixed_by_deployment
from lumo_pipeline.runner import LumoRunner


def pipeline_resources(lumo: LumoSettings, runner: LumoRunner) -> dict[str, object]:
    """Every resource the assets and checks need: settings, runner, and the IO managers of the
    tokenized_shards graph (which store nothing). Pass these to `materialize(LUMO_ASSETS, ...)`.
    Settings and runner are the deployment's: a run config cannot change them (docs/security.md)."""
    return {"lumo": fixed_by_deployment(lumo), "runner": fixed_by_deployment(runner), **io_manager_resources()}


def build_definitions(
    lumo: LumoSettings, runner: LumoRunner, executor: ExecutorDefinition = in_process_executor
) -> Definitions:
    """The code location; deployments swap the runner's mode or the executor (deploy/)."""
    return Definitions(
        assets=[*INPUT_ASSETS, *LUMO_ASSETS],
        asset_checks=LUMO_CHECKS,
        jobs=[reaudit_job, tokenization_job],
        schedules=[nightly_reaudit],
        sensors=[manifest_changed, inputs_observed],
        resources=pipeline_resources(lumo, runner),
        executor=executor,
    )


defs = build_definitions(LumoSettings.from_environment(), LumoRunner.from_environment())
