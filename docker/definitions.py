"""Lumo's code location in the compose deployment (docker/compose.yaml, service `lumo_code`).

The definitions of `lumo_pipeline.definitions` with one difference: the steps run in containers of
the GPU image named by LUMO_RUNNER_IMAGE, started through the host's Docker socket, instead of as
local subprocesses.
"""

from dagster import EnvVar

from lumo_pipeline.definitions import build_definitions
from lumo_pipeline.resources import LumoSettings
from lumo_pipeline.runner import LumoRunner

defs = build_definitions(LumoSettings.from_environment(), LumoRunner(mode="docker", image=EnvVar("LUMO_RUNNER_IMAGE")))
