"""Lumo's Dagster layer: assets, asset checks, jobs, the nightly re-audit and the manifest sensor
over lumo_core. `defs` is exported here too, so `dagster ... -m lumo_pipeline` finds it."""

from lumo_pipeline.definitions import defs

__all__ = ["defs"]
