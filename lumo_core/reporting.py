"""Progress and results of a `lumo` command.

Log lines go to stderr. When the command was launched by Dagster Pipes (the orchestrator sets
DAGSTER_PIPES_CONTEXT), the same lines, the materialization metadata and the check results also
go back through `dagster-pipes`, the small dependency-free half of Pipes; `lumo_core` never
imports Dagster itself.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import AbstractContextManager
from typing import Any, Self


def running_under_pipes() -> bool:
    return "DAGSTER_PIPES_CONTEXT" in os.environ


class Reporter(AbstractContextManager):
    """Use as `with Reporter("tokenize") as reporter: ...`."""

    def __init__(self, step: str, progress_interval_s: float = 5.0, open_pipes: bool = True) -> None:
        self.step = step
        self.open_pipes = open_pipes
        self.progress_interval_s = progress_interval_s
        self._pipes = None
        self._pipes_cm = None
        self._started = time.monotonic()
        self._last_progress = 0.0

    def __enter__(self) -> Self:
        if self.open_pipes and running_under_pipes():
            from dagster_pipes import open_dagster_pipes

            self._pipes_cm = open_dagster_pipes()
            self._pipes = self._pipes_cm.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> bool | None:
        from lumo_core.errors import LumoError

        if self._pipes is not None and isinstance(exc_info[1], LumoError):
            # At ERROR level in the run's log; the exception itself then closes Pipes, which is
            # how the Dagster side reads the reason for the step's failure (lumo_pipeline.runner).
            self._pipes.log.error(f"lumo {self.step}: error: {exc_info[1]}")
        if self._pipes_cm is not None:
            return self._pipes_cm.__exit__(*exc_info)
        return None

    @property
    def pipes(self):
        """The PipesContext when running under Dagster Pipes, else None."""
        return self._pipes

    def log(self, message: str) -> None:
        line = f"[lumo {self.step}] {message}"
        print(line, file=sys.stderr, flush=True)
        if self._pipes is not None:
            self._pipes.log.info(line)

    def progress(self, done: int, total: int | None, unit: str = "samples", force: bool = False) -> None:
        """Rate-limited progress line with counts and rate."""
        now = time.monotonic()
        if not force and now - self._last_progress < self.progress_interval_s:
            return
        self._last_progress = now
        elapsed = max(now - self._started, 1e-9)
        of_total = f"/{total}" if total is not None else ""
        self.log(f"{done}{of_total} {unit} in {elapsed:.1f} s ({done / elapsed:.1f} {unit}/s)")

    def report_materialization(
        self, metadata: dict[str, Any], data_version: str | None = None, asset_key: str | None = None
    ) -> None:
        if self._pipes is not None:
            self._pipes.report_asset_materialization(
                metadata=typed_metadata(metadata), data_version=data_version, asset_key=asset_key
            )

    def report_check(
        self,
        check_name: str,
        passed: bool,
        metadata: dict[str, Any] | None = None,
        severity: str = "ERROR",
        asset_key: str | None = None,
    ) -> None:
        self.log(f"check {check_name}: {'passed' if passed else 'FAILED'}")
        if self._pipes is not None:
            self._pipes.report_asset_check(
                check_name=check_name,
                passed=passed,
                severity=severity,
                metadata=typed_metadata(metadata or {}),
                asset_key=asset_key,
            )


def markdown(text: str) -> dict[str, Any]:
    """Mark a metadata value as markdown (rendered by the Dagster UI)."""
    return {"raw_value": text, "type": "md"}


def typed_metadata(metadata: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Plain values -> Dagster Pipes' typed form `{"raw_value": v, "type": t}`: dicts and lists
    become JSON, values already typed (see `markdown`) pass as they are. The Dagster layer turns
    the same form into MetadataValues (lumo_pipeline.metadata.as_dagster_metadata)."""
    typed = {}
    for key, value in metadata.items():
        if _is_typed(value):
            typed[key] = value
        else:
            kind = _metadata_type(value)
            typed[key] = {"raw_value": str(value) if kind == "text" else value, "type": kind}
    return typed


def _is_typed(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"raw_value", "type"}


def _metadata_type(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return "json"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if value is None:
        return "null"
    return "text"
