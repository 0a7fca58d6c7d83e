"""Lumo's code location in the compose deployment (docker/compose.yaml, service `lumo_code`).

The definitions of `lumo_pipeline.definitions` with one difference: the steps run in containers of
the GPU image named by LUMO_RUNNER_IMAGE, started through the host's Docker socket, instead of as
local subprocesses. LUMO_RUNNER_GPUS sets how many GPUs a GPU step gets (default -1: all; 0 on a
machine without GPUs, as scripts/compose_smoke.sh runs it); every other LUMO_RUNNER_* variable, or
the file LUMO_RUNNER_CONFIG names, is read the same way (lumo_pipeline.runner). These are the
deployment's settings: no run config can change them (docs/security.md).

The step containers share the code location's LUMO_CACHE_DIR (a host folder under LUMO_DATA_DIR):
the stand-in models are built once, and the embedded sample manifest that `lumo tokenize` records
in run.json is the same file for the checks' containers (with a cache private to each container,
`retokenize_matches` found "the manifest the shards were made from is gone").
"""

import os

from lumo_pipeline.definitions import build_definitions
from lumo_pipeline.resources import LumoSettings
from lumo_pipeline.runner import LumoRunner

defs = build_definitions(
    LumoSettings.from_environment(),
    LumoRunner.from_environment(mode="docker", cache_dir=os.environ.get("LUMO_CACHE_DIR") or None),
)
