"""The Dagster code location: `defs` for `dagster dev` and `dagster asset materialize -m lumo_pipeline`.

Loading this module stays light (no torch, transformers or diffusers): only the `lumo` processes
that the steps and the model-loading checks start through Pipes import them.

Executor: in-process. The default multiprocess executor starts one Python per step, and each
re-imports Dagster and this code location; the heavy work already runs in its own `lumo` process
through Pipes. Measured on the 2-core development machine, `--select token_space,manifest_audit`
(3 steps): in-process 33-42 s wall, 27-28 s CPU; multiprocess 51-64 s wall, 40-43 s CPU.
"""

from __future__ import annotations

from dagster import Definitions, ExecutorDefinition, in_process_executor

from lumo_pipeline.assets import LUMO_ASSETS
from lumo_pipeline.checks import LUMO_CHECKS
from lumo_pipeline.jobs import (
    manifest_changed,
    nightly_reaudit,
    reaudit_job,
    tokenization_job,
)
from lumo_pipeline.resources import LumoSettings
from lumo_pipeline.runner import LumoRunner


def build_definitions(lumo: LumoSettings, runner: LumoRunner, executor: ExecutorDefinition = in_process_executor) -> Definitions:
    """The code location; deployments swap the runner's mode or the executor (deploy/)."""
    return Definitions(
        assets=LUMO_ASSETS,
        asset_checks=LUMO_CHECKS,
        jobs=[reaudit_job, tokenization_job],
        schedules=[nightly_reaudit],
        sensors=[manifest_changed],
        resources={"lumo": lumo, "runner": runner},
        executor=executor,
    )


defs = build_definitions(LumoSettings.from_environment(), LumoRunner())
