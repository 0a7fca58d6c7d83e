"""The settings resource (docs/contract.md §2 as a Dagster resource), and how the code location
hands its resources to Dagster: fixed by the deployment, closed to run config.

Every field is optional. A field bound to an environment variable uses `EnvVar`, so the UI shows
where the value comes from; an unset variable is simply not bound (Dagster errors on an `EnvVar`
whose variable is unset), and `lumo_core.config.Settings` (pydantic-settings) then supplies the
contract default. The defaults and the variable names therefore live in one place, lumo_core, for
the CLI and Dagster alike.
"""

from __future__ import annotations

import os

from dagster import ConfigurableResource, EnvVar, InitResourceContext, ResourceDefinition
from pydantic import Field

from lumo_core.config import Settings

SETTINGS_FIELDS = ("output_dir", "manifest", "uti_config", "train_config")
# Resource field -> environment variable (docs/contract.md §2), as lumo_core's Settings names them.
SETTINGS_ENV_VARS = {field: f"{Settings.model_config['env_prefix']}{field.upper()}" for field in SETTINGS_FIELDS}


class LumoSettings(ConfigurableResource):
    """Where Lumo reads its inputs and writes its outputs. Unset fields take the contract defaults."""

    output_dir: str | None = Field(
        default=None, description="root of every output (LUMO_OUTPUT_DIR; default ./outputs)"
    )
    manifest: str | None = Field(
        default=None, description="JSONL manifest (LUMO_MANIFEST; default: the embedded sample)"
    )
    uti_config: str | None = Field(
        default=None, description="tokenizer config YAML (LUMO_UTI_CONFIG; default: embedded)"
    )
    train_config: str | None = Field(
        default=None, description="training config YAML (LUMO_TRAIN_CONFIG; default: embedded)"
    )

    @classmethod
    def from_environment(cls) -> LumoSettings:
        return cls(**{field: EnvVar(name) for field, name in SETTINGS_ENV_VARS.items() if os.environ.get(name)})

    def resolve(self) -> Settings:
        """The settings with every default filled in; paths made absolute, since the steps run
        in other processes (and containers) whose working directory may differ. A manifest left
        unset stays None: the embedded sample, which the step that reads it writes."""
        settings = Settings.from_env(**{name: getattr(self, name) or None for name in SETTINGS_FIELDS})
        return settings.model_copy(
            update={
                name: getattr(settings, name).absolute()
                for name in SETTINGS_FIELDS
                if getattr(settings, name) is not None
            }
        )


def fixed_by_deployment(resource: ConfigurableResource) -> ResourceDefinition:
    """`resource` for Dagster with an empty config schema. A ConfigurableResource given to
    Definitions as it is turns the values it was built with into run-config defaults, which any
    launch may override: `resources.runner.config.env.PYTHONPATH` ran code in every step, `image`
    and `extra_mounts` started any image with host folders. Here the values are the ones the code
    location built from its environment, and a run config that sets any field is refused by
    Dagster's config validation before a step runs. EnvVar fields still resolve in the process
    that runs the step, as Dagster resolves them."""

    def initialize(_context: InitResourceContext) -> ConfigurableResource:
        # A copy, as Dagster hands each step its own; built directly, since Dagster's own
        # initializer (process_config_and_initialize) opens an instance per call that is never closed.
        values = {name: getattr(resource, name) for name in type(resource).model_fields}
        return type(resource)(
            **{name: value.get_value() if isinstance(value, EnvVar) else value for name, value in values.items()}
        )

    return ResourceDefinition(
        resource_fn=initialize,
        config_schema={},
        description=f"{type(resource).__doc__} Set by the deployment, not by run config (docs/security.md).",
    )
