"""The one place Lumo reaches into Dagster's private modules (`dagster._core`).

Dagster does not export these names publicly, and its private layout may change in any release:
the packages are pinned together in pyproject.toml (dagster==1.13.27), and an upgrade is checked
here first. ruff bans `dagster._core` imports everywhere else (pyproject.toml, TID251).
"""

from dagster._core.definitions.data_version import (  # noqa: TID251
    # The tag an observation's data version is stored under, and its reader: how a sensor reads
    # the newest content version of an observable source asset from the event log.
    DATA_VERSION_TAG,
    extract_data_version_from_entry,
)
from dagster._core.definitions.dependency import NodeHandle  # noqa: TID251
from dagster._core.errors import DagsterPipesExecutionError  # noqa: TID251 (a `lumo` process exited non-zero)
from dagster._core.instance.config import dagster_instance_config  # noqa: TID251
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus  # noqa: TID251

__all__ = [
    "DATA_VERSION_TAG",
    "AssetCheckExecutionRecordStatus",
    "DagsterPipesExecutionError",
    "NodeHandle",
    "dagster_instance_config",
    "extract_data_version_from_entry",
]
