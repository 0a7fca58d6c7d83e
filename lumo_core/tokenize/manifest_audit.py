"""The manifest audit (docs/contract.md §3): every line of a manifest checked, media included, in
guarded decoder workers, written as `rows.parquet` (one row per line), `rejects.jsonl` and
`report.json` (last; the commit point) with the report's counts and distributions."""

from __future__ import annotations

import json
import os
from array import array
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lumo_core.config import TASKS, UTIConfig
from lumo_core.errors import DECODER_FAULTS, ManifestError, MediaError, UnreadableMediaError
from lumo_core.fileio import atomic_write_bytes, canonical_json_bytes
from lumo_core.tokenize.decode_workers import GuardedPool, inject_testing_fault, out_of_memory
from lumo_core.tokenize.manifest import ManifestRow, Reject, allowed_roots, check_media, iter_manifest, manifest_sha256
from lumo_core.uti import media

REPORT_FORMAT_VERSION = 1
# Per-task bucket in the report for rejects whose task could not be read.
NO_TASK = "no_task"
PARQUET_BATCH_ROWS = 65536


ROW_SCHEMA_FIELDS = (
    ("line", "int64"),
    ("id", "string"),
    ("task", "string"),
    ("status", "string"),
    ("reason_code", "string"),
    ("reason", "string"),
    ("image", "string"),
    ("audio", "string"),
    ("width", "int32"),
    ("height", "int32"),
    ("seconds", "float64"),
    ("sample_rate", "int32"),
    ("channels", "int32"),
)


def audit_manifest(
    manifest: str | os.PathLike,
    config: UTIConfig,
    out_dir: str | os.PathLike,
    map_path: Callable[[str], str] | None = None,
) -> dict[str, Any]:
    """Check every line of the manifest, media included, and write into `out_dir`:
    `rows.parquet` (one row per line), `rejects.jsonl` and `report.json` (last; the commit
    point). Bad rows never stop the audit. Returns the report."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = Path(manifest)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not manifest.is_file():
        raise ManifestError(f"{manifest}: manifest file not found")
    digest = manifest_sha256(manifest)
    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in ROW_SCHEMA_FIELDS])
    stats = _AuditStats()
    rows_path, rejects_path = out_dir / "rows.parquet", out_dir / "rejects.jsonl"
    rows_tmp, rejects_tmp = _temp_name(rows_path), _temp_name(rejects_path)
    _remove_orphans(out_dir)
    batch: dict[str, list[Any]] = {name: [] for name, _ in ROW_SCHEMA_FIELDS}
    workers = config.pipeline.num_workers
    # The media checks run in guarded worker processes (lumo_core.tokenize.decode_workers): a file that
    # hangs or crashes its decoder is a reject, never the end of the audit.
    pool = (
        GuardedPool(
            workers,
            _audit_in_worker,
            _init_audit_worker,
            (config,),
            timeout_s=config.pipeline.decoder_timeout_s,
            fault=_fault_record,
            memory_limit_bytes=config.limits.decoder_memory_bytes,
        )
        if workers
        else None
    )
    try:
        with pq.ParquetWriter(rows_tmp, schema) as parquet, open(rejects_tmp, "w", encoding="utf-8") as rejects:
            items = iter_manifest(manifest, config, map_path)
            if pool is None:
                records = (_audit_one(item, config) for item in items)
            else:
                records = (
                    item if isinstance(item, dict) else _audit_one(item, config)
                    for item in pool.imap(items, 16 * workers, passthrough=lambda item: isinstance(item, Reject))
                )
            for record in records:
                stats.add(record)
                if record["status"] == "rejected":
                    reject = {"line": record["line"], "id": record["id"], "reason": record["reason"]}
                    rejects.write(json.dumps(reject, sort_keys=True, ensure_ascii=False) + "\n")
                for name in batch:
                    batch[name].append(record.get(name))
                if len(batch["line"]) >= PARQUET_BATCH_ROWS:
                    parquet.write_table(pa.Table.from_pydict(batch, schema=schema))
                    batch = {name: [] for name in batch}
            parquet.write_table(pa.Table.from_pydict(batch, schema=schema))
            rejects.flush()
            os.fsync(rejects.fileno())
        os.replace(rows_tmp, rows_path)
        os.replace(rejects_tmp, rejects_path)
    finally:
        if pool is not None:
            pool.close(kill=True)
        for leftover in (rows_tmp, rejects_tmp):
            leftover.unlink(missing_ok=True)

    report = {
        "format_version": REPORT_FORMAT_VERSION,
        "manifest": os.path.abspath(manifest),
        "manifest_sha256": digest,
        "allowed_roots": [str(root) for root in allowed_roots(manifest, config)],
        "limits": {
            "max_image_pixels": config.limits.max_image_pixels,
            "max_audio_seconds": config.limits.max_audio_seconds,
            "max_line_bytes": config.limits.max_line_bytes,
            "max_json_depth": config.limits.max_json_depth,
            "max_caption_chars": config.limits.max_caption_chars,
            "max_media_bytes": config.limits.max_media_bytes,
            "max_audio_sample_rate": config.limits.max_audio_sample_rate,
            "max_audio_channels": config.limits.max_audio_channels,
            "max_audio_samples": config.limits.max_audio_samples,
            "image_formats": list(config.limits.image_formats),
        },
        **stats.summary(),
    }
    atomic_write_bytes(out_dir / "report.json", canonical_json_bytes(report))
    return report


_AUDIT_WORKER: dict[str, UTIConfig] = {}


def _init_audit_worker(config: UTIConfig) -> None:
    media.warm_decoders()
    _AUDIT_WORKER["config"] = config


def _audit_in_worker(row: ManifestRow) -> dict[str, Any]:
    inject_testing_fault(row.media_path)
    return _audit_one(row, _AUDIT_WORKER["config"])


def _fault_record(row: ManifestRow, code: str, detail: str) -> dict[str, Any]:
    """The record of a row whose media worker hung, died or raised."""
    return {
        **_row_record(row),
        **_reject_record(Reject.from_media_error(row, DECODER_FAULTS[code](row.media_path, detail))),
    }


def _row_record(row: ManifestRow) -> dict[str, Any]:
    return {
        "line": row.line,
        "id": row.id,
        "task": row.task,
        "image": str(row.image) if row.image is not None else None,
        "audio": str(row.audio) if row.audio is not None else None,
    }


def _audit_one(item: ManifestRow | Reject, config: UTIConfig) -> dict[str, Any]:
    if isinstance(item, Reject):
        return _reject_record(item)
    record = _row_record(item)
    try:
        info = check_media(item, config)
    except MediaError as error:
        return {**record, **_reject_record(Reject.from_media_error(item, error))}
    except MemoryError:
        return {
            **record,
            **_reject_record(
                Reject.from_media_error(item, out_of_memory(item.media_path, config.limits.decoder_memory_bytes))
            ),
        }
    except Exception as error:  # noqa: BLE001 - a decoder bug on one hostile file must not stop the audit
        failure = UnreadableMediaError(item.media_path, f"decoder failed ({type(error).__name__}: {error})")
        return {**record, **_reject_record(Reject.from_media_error(item, failure))}
    return {**record, **info, "status": "ok"}


def _reject_record(reject: Reject) -> dict[str, Any]:
    return {
        "line": reject.line,
        "id": reject.id,
        "task": reject.task,
        "status": "rejected",
        "reason_code": reject.code,
        "reason": reject.reason,
    }


class _AuditStats:
    """Counts and the numeric columns the report's distributions need (8 bytes per value)."""

    def __init__(self) -> None:
        self.tasks: Counter[tuple[str, str]] = Counter()
        self.reasons: Counter[str] = Counter()
        self.sample_rates: Counter[int] = Counter()
        self.channels: Counter[int] = Counter()
        self.seconds = array("d")
        self.widths = array("q")
        self.heights = array("q")

    def add(self, record: dict[str, Any]) -> None:
        self.tasks[(record["task"] or NO_TASK, record["status"])] += 1
        if record["status"] == "rejected":
            self.reasons[record["reason_code"]] += 1
        elif "seconds" in record:
            self.seconds.append(record["seconds"])
            self.sample_rates[record["sample_rate"]] += 1
            self.channels[record["channels"]] += 1
        else:
            self.widths.append(record["width"])
            self.heights.append(record["height"])

    def summary(self) -> dict[str, Any]:
        n_ok = sum(n for (_, status), n in self.tasks.items() if status == "ok")
        n_rejected = sum(self.reasons.values())
        n_lines = n_ok + n_rejected
        tasks = {task: {"ok": 0, "rejected": 0} for task in TASKS}
        for (task, status), count in self.tasks.items():
            tasks.setdefault(task, {"ok": 0, "rejected": 0})[status] = count
        widths = np.frombuffer(self.widths, dtype=np.int64)
        heights = np.frombuffer(self.heights, dtype=np.int64)
        return {
            "n_lines": n_lines,
            "n_ok": n_ok,
            "n_rejected": n_rejected,
            "reject_rate": round(n_rejected / n_lines, 6) if n_lines else 0.0,
            "tasks": tasks,
            "reject_reasons": dict(self.reasons),
            "audio_seconds": _distribution(
                np.frombuffer(self.seconds, dtype=np.float64), with_mean=True, percentiles=(50, 95)
            ),
            "image_size": {
                "width": _distribution(widths, percentiles=(50,)),
                "height": _distribution(heights, percentiles=(50,)),
                "pixels": _distribution(widths * heights, percentiles=(50,)),
            },
            "sample_rates": {str(rate): count for rate, count in self.sample_rates.items()},
            "channels": {str(channels): count for channels, count in self.channels.items()},
        }


def _distribution(values: np.ndarray, percentiles: tuple[int, ...], with_mean: bool = False) -> dict[str, Any]:
    keys = ["min", *(["mean"] if with_mean else []), *(f"p{p}" for p in percentiles), "max"]
    if values.size == 0:
        return {"count": 0, **{key: None for key in keys}}
    integral = values.dtype.kind in "iu"
    out: dict[str, Any] = {
        "count": int(values.size),
        "min": _number(values.min(), integral),
        "max": _number(values.max(), integral),
    }
    if with_mean:
        out["mean"] = _number(values.mean(), integral)
    for p, value in zip(percentiles, np.percentile(values, percentiles)):
        out[f"p{p}"] = _number(value, integral)
    return out


def _number(value: np.generic, integral: bool) -> int | float:
    """Plain JSON numbers: integers stay integers where the statistic is whole; floats are
    rounded so that the report reads well."""
    as_float = float(value)
    return int(as_float) if integral and as_float.is_integer() else round(as_float, 6)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _remove_orphans(out_dir: Path) -> None:
    """Temporary files of audits whose process is gone (killed before they could remove them)."""
    for leftover in out_dir.glob(".*.tmp-*"):
        pid = leftover.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                leftover.unlink(missing_ok=True)
            except PermissionError:
                pass  # another user's live process
