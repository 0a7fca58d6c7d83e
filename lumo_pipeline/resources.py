"""The settings resource: CONTRACT section 2 as a Dagster resource.

Every field is optional. A field bound to an environment variable uses `EnvVar`, so the UI shows
where the value comes from; an unset variable is simply not bound (Dagster errors on an `EnvVar`
whose variable is unset), and `lumo_core.config.Settings.from_env` then supplies the contract
default. The defaults therefore live in one place, lumo_core, for the CLI and Dagster alike.
"""

from __future__ import annotations

import os
from pathlib import Path

from dagster import ConfigurableResource, EnvVar
from pydantic import Field

from lumo_core.config import Settings

# Resource field -> environment variable (CONTRACT section 2).
SETTINGS_ENV_VARS = {
    "output_dir": "LUMO_OUTPUT_DIR",
    "manifest": "LUMO_MANIFEST",
    "uti_config": "LUMO_UTI_CONFIG",
    "train_config": "LUMO_TRAIN_CONFIG",
}


class LumoSettings(ConfigurableResource):
    """Where Lumo reads its inputs and writes its outputs. Unset fields take the contract defaults."""

    output_dir: str | None = Field(default=None, description="root of every output (LUMO_OUTPUT_DIR; default ./outputs)")
    manifest: str | None = Field(default=None, description="JSONL manifest (LUMO_MANIFEST; default: the embedded sample)")
    uti_config: str | None = Field(default=None, description="tokenizer config YAML (LUMO_UTI_CONFIG; default: embedded)")
    train_config: str | None = Field(default=None, description="training config YAML (LUMO_TRAIN_CONFIG; default: embedded)")

    @classmethod
    def from_environment(cls) -> LumoSettings:
        return cls(**{field: EnvVar(name) for field, name in SETTINGS_ENV_VARS.items() if os.environ.get(name)})

    def resolve(self) -> Settings:
        """The settings with every default filled in; paths made absolute, since the steps run
        in other processes (and containers) whose working directory may differ."""
        overrides = {name: Path(value) for name, value in self._explicit_values().items()}
        settings = Settings.from_env(**overrides)
        return settings.model_copy(
            update={
                "output_dir": settings.output_dir.absolute(),
                "manifest": settings.manifest.absolute(),
                "uti_config": settings.uti_config.absolute() if settings.uti_config else None,
                "train_config": settings.train_config.absolute() if settings.train_config else None,
            }
        )

    def _explicit_values(self) -> dict[str, str]:
        values = {"output_dir": self.output_dir, "manifest": self.manifest, "uti_config": self.uti_config, "train_config": self.train_config}
        return {name: value for name, value in values.items() if value}
