"""Materialization metadata read from a step's output files: counts, paths, sha256s, tables and
pictures, so the Dagster UI answers "what did this step produce?" without opening a file.

The `lumo` process reports its own summary through Pipes; these functions add what reads better
as a table or a picture, computed on the orchestrator side from the files the step committed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dagster import MetadataValue, TableColumn, TableRecord, TableSchema

from lumo_core.reporting import typed_metadata
from lumo_pipeline.plots import (
    codebook_usage_png,
    image_file_markdown,
    png_markdown,
    token_length_histogram_png,
)

LENGTH_STAT_COLUMNS = ("count", "min", "mean", "p50", "p95", "max")


# Dagster Pipes' metadata types (as lumo_core.reporting.typed_metadata writes them) -> values.
_FROM_TYPED: dict[str, Callable[[Any], MetadataValue]] = {
    "json": MetadataValue.json,
    "bool": MetadataValue.bool,
    "int": MetadataValue.int,
    "float": MetadataValue.float,
    "null": lambda _: MetadataValue.null(),
    "md": MetadataValue.md,
    "text": MetadataValue.text,
}


def as_dagster_metadata(values: Mapping[str, Any]) -> dict[str, MetadataValue]:
    """Plain JSON values (as lumo_core reports them) -> Dagster metadata values."""
    plain = {key: value for key, value in values.items() if not isinstance(value, MetadataValue)}
    typed = typed_metadata(plain)
    return {
        key: value if isinstance(value, MetadataValue) else _FROM_TYPED[typed[key]["type"]](typed[key]["raw_value"])
        for key, value in values.items()
    }


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> MetadataValue:
    """A table value; `columns` are (name, dagster column type) pairs."""
    schema = TableSchema(columns=[TableColumn(name, kind) for name, kind in columns])
    return MetadataValue.table(
        records=[TableRecord({name: row.get(name) for name, _ in columns}) for row in rows], schema=schema
    )


def _read_json(path: Path) -> Any:
    return json.loads(path.read_bytes())


def token_space_metadata(step_dir: Path) -> dict[str, MetadataValue]:
    space = _read_json(step_dir / "token_space.json")
    ranges = [{**r, "end": r["start"] + r["size"]} for r in space["ranges"]]
    return {
        "path": MetadataValue.path(str(step_dir / "token_space.json")),
        "vocab_size_total": MetadataValue.int(space["vocab_size_total"]),
        "ranges": table(ranges, [("name", "string"), ("start", "int"), ("end", "int"), ("size", "int")]),
        "special_tokens": MetadataValue.json(space["special_tokens"]),
        "text_tokenizer": MetadataValue.json(space["text"]),
        "image_tokenizer": MetadataValue.json(space["image"]),
        "audio_codec": MetadataValue.json(space["audio"]),
    }


def manifest_audit_metadata(step_dir: Path) -> dict[str, MetadataValue]:
    report = _read_json(step_dir / "report.json")
    tasks = [{"task": task, **counts} for task, counts in sorted(report["tasks"].items())]
    return {
        "path": MetadataValue.path(str(step_dir / "report.json")),
        "rows_table": MetadataValue.path(str(step_dir / "rows.parquet")),
        "manifest": MetadataValue.path(report["manifest"]),
        "manifest_sha256": MetadataValue.text(report["manifest_sha256"]),
        "n_lines": MetadataValue.int(report["n_lines"]),
        "n_ok": MetadataValue.int(report["n_ok"]),
        "n_rejected": MetadataValue.int(report["n_rejected"]),
        "reject_rate": MetadataValue.float(float(report["reject_rate"])),
        "tasks": table(tasks, [("task", "string"), ("ok", "int"), ("rejected", "int")]),
        "reject_reasons": MetadataValue.json(report["reject_reasons"]),
    }


def tokenized_shards_metadata(step_dir: Path) -> dict[str, MetadataValue]:
    index = _read_json(step_dir / "index.json")
    stats = _read_json(step_dir / "stats.json")
    splits = [
        {"split": split, "shards": len(entry["shards"]), "samples": entry["n_samples"], "tokens": entry["n_tokens"]}
        for split, entry in sorted(index["splits"].items())
    ]
    lengths = [
        {"split": split, "task": task, **{column: by_task[task][column] for column in LENGTH_STAT_COLUMNS}}
        for split, by_task in sorted(stats["token_lengths"].items())
        for task in sorted(by_task)
    ]
    usage = stats["codebook_usage"]
    metadata = {
        "path": MetadataValue.path(str(step_dir)),
        "index": MetadataValue.path(str(step_dir / "index.json")),
        "token_space_sha256": MetadataValue.text(index["token_space_sha256"]),
        "n_manifest_lines": MetadataValue.int(index["n_manifest_lines"]),
        "n_samples": MetadataValue.int(index["n_samples"]),
        "n_rejected": MetadataValue.int(index["n_rejected"]),
        "splits": table(splits, [("split", "string"), ("shards", "int"), ("samples", "int"), ("tokens", "int")]),
        "shards": table(
            [
                {"name": s["name"], "sha256": s["sha256"], "samples": s["n_samples"], "tokens": s["n_tokens"]}
                for entry in index["splits"].values()
                for s in entry["shards"]
            ],
            [("name", "string"), ("sha256", "string"), ("samples", "int"), ("tokens", "int")],
        ),
        "token_lengths": table(
            lengths, [("split", "string"), ("task", "string")] + [(c, "float") for c in LENGTH_STAT_COLUMNS]
        ),
        "codebook_usage": table(
            [{"codebook": name, **usage[name]} for name in ("text", "image")]
            + [{"codebook": f"audio_cb{k}", **u} for k, u in enumerate(usage["audio"]["per_codebook"])],
            [
                ("codebook", "string"),
                ("distinct_codes", "int"),
                ("codebook_size", "int"),
                ("utilisation", "float"),
                ("entropy_bits", "float"),
                ("total_codes", "int"),
            ],
        ),
        "codebook_usage_plot": MetadataValue.md(png_markdown(codebook_usage_png(usage), "codebook usage")),
    }
    if stats["length_histogram"]:
        metadata["token_length_histogram"] = MetadataValue.md(
            png_markdown(token_length_histogram_png(stats["length_histogram"]), "token length histogram")
        )
    return metadata


def tokenized_audit_metadata(step_dir: Path) -> dict[str, MetadataValue]:
    report = _read_json(step_dir / "report.json")
    checks = [
        {"check": name, "passed": c["passed"], "description": c["description"]}
        for name, c in sorted(report["checks"].items())
    ]
    metadata = {
        "path": MetadataValue.path(str(step_dir / "report.json")),
        "passed": MetadataValue.bool(report["passed"]),
        "checks": table(checks, [("check", "string"), ("passed", "bool"), ("description", "string")]),
        "spot_checks": table(
            report["spot_checks"],
            [("id", "string"), ("shard", "string"), ("modality", "string"), ("file", "string"), ("text", "string")],
        ),
    }
    decoded_images = [s for s in report["spot_checks"] if s["file"].endswith(".png")]
    if decoded_images:
        first = decoded_images[0]
        metadata["decoded_image"] = MetadataValue.md(
            f"Decoded from the tokens of `{first['id']}` ({first['shard']}); caption: {first['text']!r}\n\n"
            + image_file_markdown(step_dir / "spot_checks" / first["file"], first["id"])
        )
    return metadata


def uti_audit_metadata(step_dir: Path) -> dict[str, MetadataValue]:
    report = _read_json(step_dir / "report.json")
    return {
        "path": MetadataValue.path(str(step_dir / "report.json")),
        "deterministic": MetadataValue.json(report["deterministic"]),
        "runtime_sizes_match": MetadataValue.bool(report["runtime_sizes_match"]),
        "token_sha256": MetadataValue.json(report["token_sha256"]),
        "audio_idempotence": MetadataValue.json(report["audio_idempotence"]),
        "recon_wav": MetadataValue.path(str(step_dir / report["smoke_test"]["recon_wav"])),
        "recon_image": MetadataValue.md(
            image_file_markdown(step_dir / report["smoke_test"]["recon_png"], "image encoded and decoded")
        ),
    }


def lm_checkpoint_metadata(final_dir: Path) -> dict[str, MetadataValue]:
    model_config = _read_json(final_dir / "config.json")
    text_config = model_config.get("text_config", model_config)
    files = [{"file": p.name, "bytes": p.stat().st_size} for p in sorted(final_dir.iterdir()) if p.is_file()]
    return {
        "path": MetadataValue.path(str(final_dir)),
        "model_type": MetadataValue.text(str(model_config.get("model_type"))),
        "vocab_size": MetadataValue.int(text_config["vocab_size"]),
        "hidden_size": MetadataValue.int(text_config["hidden_size"]),
        "num_hidden_layers": MetadataValue.int(text_config["num_hidden_layers"]),
        "files": table(files, [("file", "string"), ("bytes", "int")]),
    }


STEP_METADATA: dict[str, Callable[[Path], dict[str, MetadataValue]]] = {
    "token_space": token_space_metadata,
    "manifest_audit": manifest_audit_metadata,
    "tokenized_shards": tokenized_shards_metadata,
    "tokenized_audit": tokenized_audit_metadata,
    "uti_audit": uti_audit_metadata,
    "lm_checkpoint": lm_checkpoint_metadata,
}
