"""Lumo's code location with Dagster's multiprocess executor: one machine, N cores (or GPUs).

The definitions of `lumo_pipeline.definitions` with one difference: each step runs in a process of
its own, so the work units of `tokenized_shards` (one step each) run side by side:

    dagster asset materialize -m lumo_pipeline.multiprocess --select +tokenized_shards \\
        -c lumo_pipeline/run_configs/multiprocess.yaml

`max_concurrent` in that file is how many steps run at once (default: the CPU count). Each step
process imports Dagster and this code location again, which costs more than it saves for the small
steps (see lumo_pipeline.definitions); it pays off when the units are long.
"""

from dagster import multiprocess_executor

from lumo_pipeline.definitions import build_definitions
from lumo_pipeline.resources import LumoSettings
from lumo_pipeline.runner import LumoRunner

defs = build_definitions(LumoSettings.from_environment(), LumoRunner.from_environment(), executor=multiprocess_executor)
