"""The shard writer: a disk spool of tokenized samples, then deterministic WebDataset shards.

Why a spool: shards hold samples in key order, bounded by count and bytes, so their boundaries
are only known once every sample is tokenized. Samples (and rejects) go into an SQLite file as
they are produced (memory stays flat however long the manifest is) and survive a crash: a rerun
skips every manifest line already in the spool. Phase two reads the spool in key order and
writes each shard under a temporary name, renaming it when complete; `index.json` is written
last and is the commit point.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lumo_core.errors import DamagedFileError
from lumo_core.fileio import atomic_write_bytes, canonical_json_bytes, file_sha256, raise_if_out_of_space, sha256_hex

# Tar headers carry an mtime; a fixed one makes shards byte-reproducible.
SHARD_MTIME = 0
SPLITS = ("train", "eval")
# 2: index.json lists the dataset card (`card`); samples have one member set and one JSON schema.
# 3: every shard entry also records its file `size` in bytes (TokenizeRun.up_to_date checks it).
# 4: every shard entry lists its sample index (`sample_index`: name, sha256; lumo_core.tokenize.sample_index).
INDEX_FORMAT_VERSION = 4
CARD_NAME = "README.md"

# ----------------------------------------------------------------- the sample layout
# Every sample of every task has the same members and the same JSON schema, with typed empty
# values where a modality is absent. Readers that infer one schema from the first few samples
# (Hugging Face `datasets` reads 5) then see every member and every field of every sample: a
# member or a JSON key that only later samples carry is dropped by them without a word, a null
# followed later by a struct or a list fails the load, and an int default followed by floats
# truncates the floats. See README "Reading the shards".
SAMPLE_MEMBERS = ("audio.npy", "image.npy", "input_ids.npy", "json", "labels.npy", "text.npy")
# The media facts of each modality, with the typed default the other tasks' samples hold.
# `codec_json`: what the audio codec reports beyond these (chunk scales, last-chunk padding of
# chunked EnCodec models), as a JSON object text, because its keys vary by codec and by clip.
MEDIA_FIELDS: dict[str, dict[str, Any]] = {
    "image": {"source_width": 0, "source_height": 0, "source_sha256": "", "tokens": 0},
    "audio": {
        "source_sample_rate": 0,
        "source_channels": 0,
        "duration_s": 0.0,
        "source_sha256": "",
        "sample_rate": 0,
        "frames": 0,
        "padding_samples": 0,
        "codec_json": "{}",
    },
}


def json_text(value: Any) -> str:
    """A JSON value as compact canonical text (sorted keys), for fields of free shape."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sample_media(modality: str, facts: dict[str, Any]) -> dict[str, Any]:
    """The `media` field of a sample: every modality's facts, `facts` for `modality` (coerced to
    the schema's types; keys beyond the schema go into `codec_json`), typed defaults for the rest."""
    schema = MEDIA_FIELDS[modality]
    extra = {k: v for k, v in facts.items() if k not in schema}
    if extra and "codec_json" not in schema:
        raise ValueError(f"{modality} media facts {sorted(extra)} are not in the shard schema {sorted(schema)}")
    missing = [k for k in schema if k != "codec_json" and k not in facts]
    if missing:
        raise ValueError(f"{modality} media facts lack {missing}")
    own = {k: type(default)(facts[k]) for k, default in schema.items() if k != "codec_json"}
    if "codec_json" in schema:
        own["codec_json"] = json_text(extra)
    return {name: own if name == modality else dict(fields) for name, fields in MEDIA_FIELDS.items()}


def empty_codes(modality: str, n_codebooks: int) -> np.ndarray:
    """The codes member of a modality the sample does not hold: int32, image [0], audio
    [n_codebooks, 0]."""
    return np.zeros((n_codebooks, 0) if modality == "audio" else (0,), dtype=np.int32)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def npy_load(payload: bytes) -> np.ndarray:
    return np.lib.format.read_array(io.BytesIO(payload), allow_pickle=False)


# Per unit counts a spool keeps beside its rows (see Spool.add).
SOURCE_COUNTS = ("rows_encoded", "rows_from_cache", "cache_damaged")


@dataclass(frozen=True)
class SpooledSample:
    key: str
    split: str
    line: int
    sample_id: str
    task: str
    n_tokens: int
    members: dict[str, bytes]  # tar member suffix ("input_ids.npy", "json", ...) -> bytes
    # Where the media codes came from (reported, never written to a shard).
    from_cache: bool = False
    cache_damaged: bool = False


# A spooled sample's payload: this magic, the sha256 of what follows, a 4-byte length, a JSON
# list of (name, size), then the member bytes in that order. Anything else is refused as damaged.
PAYLOAD_MAGIC = b"LUMO-SPOOL-2\n"


def pack_members(members: dict[str, bytes]) -> bytes:
    """Members as bytes that only ever read back as bytes (no pickle), with their own sha256."""
    names = sorted(members)
    header = json.dumps([[name, len(members[name])] for name in names]).encode()
    body = len(header).to_bytes(4, "little") + header + b"".join(members[name] for name in names)
    return PAYLOAD_MAGIC + hashlib.sha256(body).digest() + body


def unpack_members(blob: bytes) -> dict[str, bytes]:
    """The members of a payload; ValueError when it is not one whole payload of pack_members."""
    start = len(PAYLOAD_MAGIC) + 32
    if not blob.startswith(PAYLOAD_MAGIC) or len(blob) < start + 4:
        raise ValueError("not a Lumo sample payload (wrong magic bytes)")
    body = memoryview(blob)[start:]
    if hashlib.sha256(body).digest() != blob[len(PAYLOAD_MAGIC) : start]:
        raise ValueError("payload does not match its sha256")
    size = int.from_bytes(body[:4], "little")
    layout = json.loads(bytes(body[4 : 4 + size]))
    offset = 4 + size
    members = {}
    for name, length in layout:
        if name not in SAMPLE_MEMBERS or not isinstance(length, int) or length < 0:
            raise ValueError(f"unexpected member {name!r} of {length!r} bytes")
        members[name] = bytes(body[offset : offset + length])
        offset += length
    if offset != len(body):
        raise ValueError(f"members cover {offset} of {len(body)} bytes")
    return members


class Spool:
    """SQLite spool of tokenized samples and rejects for one run (identified by `run_key`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path)
        try:
            self._create()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise DamagedFileError(path, f"not a readable spool ({exc})") from exc

    def verify(self) -> None:
        """SQLite's own page and index check (DamagedFileError when it fails); sample payloads
        are checked one by one as they are read (iter_split)."""
        try:
            problems = [row[0] for row in self._db.execute("PRAGMA quick_check")]
        except sqlite3.DatabaseError as exc:
            raise DamagedFileError(self.path, f"SQLite cannot check it ({exc})") from exc
        if problems != ["ok"]:
            raise DamagedFileError(self.path, "; ".join(problems[:3]))

    @staticmethod
    def remove(path: Path) -> None:
        """Delete a spool with its WAL and shared-memory files."""
        for leftover in path.parent.glob(path.name + "*"):
            leftover.unlink(missing_ok=True)

    def _create(self) -> None:
        self._db.executescript(
            """
            PRAGMA journal_mode=WAL;
            PRAGMA synchronous=NORMAL;
            CREATE TABLE IF NOT EXISTS samples (
                key TEXT PRIMARY KEY, split TEXT NOT NULL, line INTEGER NOT NULL UNIQUE,
                id TEXT NOT NULL, task TEXT NOT NULL, n_tokens INTEGER NOT NULL,
                size INTEGER NOT NULL, payload BLOB NOT NULL);
            CREATE TABLE IF NOT EXISTS rejects (
                line INTEGER PRIMARY KEY, id TEXT, reason TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
            """
        )

    def close(self) -> None:
        self._db.close()

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def done_lines(self) -> set[int]:
        lines = {r[0] for r in self._db.execute("SELECT line FROM samples")}
        lines.update(r[0] for r in self._db.execute("SELECT line FROM rejects"))
        return lines

    def add(
        self,
        samples: list[SpooledSample],
        rejects: list[tuple[int, str | None, str]],
        counts: dict[str, int] | None = None,
    ) -> None:
        """Commit a batch of samples and rejects, and add `counts` to the spool's counts, in one
        transaction: a crash never leaves rows without their counts or counts without rows."""
        rows = [
            (
                s.key,
                s.split,
                s.line,
                s.sample_id,
                s.task,
                s.n_tokens,
                sum(len(v) for v in s.members.values()),
                pack_members(s.members),
            )
            for s in samples
        ]
        try:
            with self._db:
                self._db.executemany("INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
                self._db.executemany("INSERT INTO rejects VALUES (?, ?, ?)", rejects)
                for name, value in (counts or {}).items():
                    self._db.execute(
                        "INSERT INTO meta VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = CAST(v AS INTEGER) + ?",
                        (name, str(value), value),
                    )
        except sqlite3.OperationalError as exc:
            # The transaction is rolled back: the spool holds what it held before this batch.
            # SQLite reports ENOSPC as "full" and a write over RLIMIT_FSIZE as an I/O error.
            if "full" not in str(exc) and "I/O" not in str(exc):
                raise
            needed = sum(len(row[-1]) for row in rows) + sum(len(str(r)) for r in rejects)
            raise_if_out_of_space(
                OSError(errno.EFBIG if "I/O" in str(exc) else errno.ENOSPC, str(exc)),
                self.path,
                needed,
                kept="the batch was rolled back, the spool keeps its earlier rows",
            )
            raise

    def get_count(self, name: str) -> int:
        return int(self.get_meta(name) or 0)

    def iter_sizes(self, split: str) -> Iterator[tuple[str, int]]:
        """(key, payload bytes) in key order, without reading the payloads."""
        yield from self._db.execute("SELECT key, size FROM samples WHERE split = ? ORDER BY key", (split,))

    def iter_split(self, split: str) -> Iterator[tuple[str, int, dict[str, bytes]]]:
        """(key, n_tokens, members) in key order."""
        cursor = self._db.execute("SELECT key, n_tokens, payload FROM samples WHERE split = ? ORDER BY key", (split,))
        for key, n_tokens, payload in cursor:
            try:
                members = unpack_members(payload)
            except (ValueError, TypeError) as exc:
                raise DamagedFileError(self.path, f"sample {key}: {exc}") from exc
            yield key, n_tokens, members

    def iter_rejects(self) -> Iterator[tuple[int, str | None, str]]:
        yield from self._db.execute("SELECT line, id, reason FROM rejects ORDER BY line")

    def count(self, split: str | None = None) -> int:
        if split is None:
            return self._db.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
        return self._db.execute("SELECT COUNT(*) FROM samples WHERE split = ?", (split,)).fetchone()[0]

    def lengths(self) -> Iterator[tuple[str, str, int]]:
        """(split, task, n_tokens) of every sample, in key order."""
        for _, split, task, n_tokens in self.keyed_lengths():
            yield split, task, n_tokens

    def keyed_lengths(self) -> Iterator[tuple[str, str, str, int]]:
        """(key, split, task, n_tokens) of every sample, in key order."""
        yield from self._db.execute("SELECT key, split, task, n_tokens FROM samples ORDER BY key")


def plan_shards(sizes: Iterator[tuple[str, int]], max_samples: int, max_bytes: int) -> list[list[str]]:
    """Group keys (already in key order) into shards of at most `max_samples` samples and
    `max_bytes` payload bytes (a single larger sample gets a shard of its own)."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for key, size in sizes:
        if current and (len(current) >= max_samples or current_bytes + size > max_bytes):
            shards.append(current)
            current, current_bytes = [], 0
        current.append(key)
        current_bytes += size
    if current:
        shards.append(current)
    return shards


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write one shard to `<path>.tmp`, fsync, then rename to `path`."""
    import webdataset

    tmp = path.with_name(path.name + ".tmp")
    writer = None
    try:
        with open(tmp, "wb") as stream:
            writer = webdataset.TarWriter(stream, mtime=SHARD_MTIME, encoder=False)
            for key, members in samples:
                writer.write({"__key__": key, **members})
            writer.close()
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException as exc:
        if writer is not None:
            # Marks the tar stream closed; else its finalizer writes to the closed file later.
            with contextlib.suppress(Exception):
                writer.close()
        tmp.unlink(missing_ok=True)
        # A tar member takes a 512-byte header and is padded to 512 bytes.
        needed = sum(512 + -(-len(value) // 512) * 512 for _, members in samples for value in members.values()) + 1024
        raise_if_out_of_space(exc, path, needed)
        raise
    os.replace(tmp, path)


class _HashingSink:
    """A write-only stream that keeps only the sha256 of what is written to it."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return len(data)

    def flush(self) -> None:
        pass


def shard_sha256(samples: list[tuple[str, dict[str, bytes]]]) -> str:
    """The sha256 write_shard's file would have, computed without writing it."""
    import webdataset

    sink = _HashingSink()
    writer = webdataset.TarWriter(sink, mtime=SHARD_MTIME, encoder=False)
    for key, members in samples:
        writer.write({"__key__": key, **members})
    writer.close()
    return sink.digest.hexdigest()


def write_split_shards(
    spool: Any, out_dir: Path, split: str, max_samples: int, max_bytes: int, reporter: Any = None
) -> dict[str, Any]:
    """Write (or reuse, when already complete under its final name) every shard of a split."""
    split_dir = out_dir / split
    split_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_shards(spool.iter_sizes(split), max_samples, max_bytes)
    samples_iter = spool.iter_split(split)
    entries = []
    reused = 0
    for number, keys in enumerate(plan):
        name = f"{split}/shard-{number:06d}.tar"
        path = out_dir / name
        batch = [next(samples_iter) for _ in keys]
        n_tokens = int(sum(tokens for _, tokens, _ in batch))
        samples = [(k, m) for k, _, m in batch]
        # A shard under its final name (left by a run that stopped later) is reused only when its
        # bytes are the ones this spool makes; a damaged one is written again.
        already_complete = path.is_file() and file_sha256(path) == shard_sha256(samples)
        if already_complete:
            reused += 1
        else:
            if path.is_file() and reporter is not None:
                reporter.log(
                    f"{split}: shard {number + 1}/{len(plan)} on disk does not hold this spool's bytes: written again"
                )
            write_shard(path, samples)
        entries.append(
            {
                "name": name,
                "sha256": file_sha256(path),
                "size": path.stat().st_size,
                "n_samples": len(keys),
                "n_tokens": n_tokens,
            }
        )
        if reporter is not None:
            reporter.log(f"{split}: shard {number + 1}/{len(plan)} {'reused' if already_complete else 'written'}")
    expected = {Path(e["name"]).name for e in entries}
    for stale in split_dir.iterdir():
        if stale.name not in expected:
            stale.unlink()
    return {
        "shards": entries,
        "n_shards": len(entries),
        "n_samples": sum(e["n_samples"] for e in entries),
        "n_tokens": sum(e["n_tokens"] for e in entries),
        "reused_shards": reused,
    }


def write_index(out_dir: Path, index: dict[str, Any]) -> str:
    """Write index.json atomically (the commit point); returns its sha256."""
    payload = canonical_json_bytes(index)
    atomic_write_bytes(out_dir / "index.json", payload)
    return sha256_hex(payload)


def clear_outputs(out_dir: Path) -> None:
    """Remove a previous run's outputs, the commit point first."""
    (out_dir / "index.json").unlink(missing_ok=True)
    for name in ("stats.json", "rejects.jsonl", "run.json", CARD_NAME):
        (out_dir / name).unlink(missing_ok=True)
    for split in SPLITS:
        shutil.rmtree(out_dir / split, ignore_errors=True)


def read_index(out_dir: Path) -> dict[str, Any]:
    from lumo_core.errors import MissingUpstreamError, rebuild_hint

    path = Path(out_dir) / "index.json"
    if not path.is_file():
        raise MissingUpstreamError(
            f"{path} not found: tokenize first: {rebuild_hint('tokenized_shards', 'lumo tokenize')}"
        )
    return json.loads(path.read_bytes())


def iter_shard_samples(shard_path: Path) -> Iterator[dict[str, Any]]:
    """Samples of one shard as webdataset yields them (raw bytes per member)."""
    import webdataset

    dataset = webdataset.WebDataset(str(shard_path), shardshuffle=False, empty_check=False)
    yield from dataset


# ------------------------------------------------------------------ the dataset card
def _card_yaml(index: dict[str, Any]) -> str:
    """The YAML header Hugging Face `datasets` reads: one config whose splits are the shard
    folders. Only splits with shards are named (a pattern matching no file fails the whole
    load); with no shard at all both are named, so the load fails saying so."""
    splits = [split for split in SPLITS if index["splits"][split]["n_shards"]] or list(SPLITS)
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split in splits:
        lines += [f"  - split: {split}", f"    path: {split}/shard-*.tar"]
    return "\n".join([*lines, "---", ""])


def dataset_card(
    index: dict[str, Any], space: Any, task_counts: dict[tuple[str, str], tuple[int, int]], pipeline_version: str
) -> bytes:
    """The shards folder's README.md: the splits for `load_dataset(<folder>)`, what the shards
    hold (token space, counts per task and split, token layout, sample layout) and how to read
    and decode them. Only facts of the inputs go in, so equal runs write equal bytes.

    `task_counts`: (split, task) -> (samples, tokens)."""
    sha = index["token_space_sha256"]
    out = [_card_yaml(index), "# Lumo tokenized shards", ""]
    out += [
        (
            "Text, images and audio as discrete tokens of **one shared vocabulary**, written by Lumo "
            f"(pipeline version {pipeline_version}) as WebDataset shards. `index.json` lists every shard with its "
            "sha256 and this card with its sha256; it is written last, so a folder holding it is complete."
        ),
        "",
        (
            f"- token space sha256: `{sha}` (every sample's `json.token_space_sha256` holds it: tokens are only "
            "meaningful with this token space, and Lumo's training refuses shards of another)"
        ),
        (
            f"- manifest lines: {index['n_manifest_lines']}; samples: {index['n_samples']}; rejected rows: "
            f"{index['n_rejected']} (`rejects.jsonl`: line, id, reason)"
        ),
        "",
        "## Samples per task and split",
        "",
        "| split | task | samples | tokens |",
        "|---|---|---:|---:|",
    ]
    for split in SPLITS:
        tasks = sorted(task for s, task in task_counts if s == split)
        for task in tasks:
            n, tokens = task_counts[(split, task)]
            out.append(f"| {split} | {task} | {n} | {tokens} |")
        out.append(f"| {split} | all | {index['splits'][split]['n_samples']} | {index['splits'][split]['n_tokens']} |")
    out += [
        "",
        "## The token layout",
        "",
        f"{space.vocab_size_total} ids, contiguous, in this order:",
        "",
        "| range | first id | last id | ids |",
        "|---|---:|---:|---:|",
    ]
    for r in space.ranges:
        out.append(f"| {r.name} | {r.start} | {r.end - 1} | {r.size} |")
    specials = ", ".join(
        f"`{name}` {token_id}" for name, token_id in sorted(space.special_tokens.items(), key=lambda item: item[1])
    )
    image, audio = space.image, space.audio
    out += [
        "",
        f"- text: the ids of the text tokenizer (`{space.text.get('tokenizer', space.text.get('kind'))}`) as they are.",
        f"- special tokens: {specials}.",
        (
            f"- image: {space.tokens_per_image} codes of {image.get('codebook_size')} per image "
            f"(`{image.get('tokenizer', image.get('kind'))}`, {image.get('resolution')} px); global id = image first id + code."
        ),
        (
            f"- audio: {space.n_audio_codebooks} codebooks of {audio.get('codebook_size')} at {audio.get('frame_rate')} frames/s "
            f"(`{audio.get('codec', audio.get('kind'))}`, {audio.get('sample_rate')} Hz), flattened frame by frame "
            "(`f0c0 f0c1 ... f1c0 ...`): flat position p of an audio span is codebook p % n_codebooks, and global id = "
            "that codebook's first id + code."
        ),
        "",
        "Sequences per task, prompt then target (labels are -100 on the prompt):",
        "",
    ]
    # A list, not a table: the special tokens' `|` would split table cells.
    for task, template in sorted(space.extra.get("templates", {}).items()):
        out.append(f"- {task}: `{' '.join(template['prompt'])}` then `{' '.join(template['target'])}`")
    out += [
        "",
        "## A sample",
        "",
        (
            "Every sample of every task has the same members and the same JSON schema; what a task does not use is "
            "a typed empty value, never a missing member or a null:"
        ),
        "",
        "- `input_ids.npy`: int32 [n_tokens], the global ids of the whole sequence",
        "- `labels.npy`: int32 [n_tokens], -100 where no loss is taken",
        "- `text.npy`: int32 [n], the text tokenizer's own ids of the caption",
        f"- `image.npy`: int32 [{space.tokens_per_image}], the image codes; shape [0] in audio tasks",
        (
            f"- `audio.npy`: int32 [{space.n_audio_codebooks}, frames], the codes per codebook; shape "
            f"[{space.n_audio_codebooks}, 0] in image tasks"
        ),
        (
            "- `json`: `id`, `task`, `split`, `text`, `n_tokens`, `token_sha256` (sha256 of `input_ids` as little-endian "
            "int32 bytes), `token_space_sha256`, `spans` (`{modality, start, end}` into `input_ids`), `media` "
            "(`image` and `audio` facts: source size, duration, sample rates, frames, padding, source sha256; "
            'zeros and "" for the modality the task lacks; `media.audio.codec_json`: the codec\'s other facts as '
            "JSON text) and `metadata_json` (the manifest row's own extra keys, as JSON text)"
        ),
        "",
        "## Reading",
        "",
        "```python",
        "from glob import glob",
        "from datasets import load_dataset",
        "",
        'ds = load_dataset("path/to/tokenized_shards")  # this card names the splits: train, eval',
        'files = {s: sorted(glob(f"path/to/tokenized_shards/{s}/*.tar")) for s in ("train", "eval")}',
        'ds = load_dataset("webdataset", data_files=files, streaming=True)  # or the shards themselves',
        'sample = next(iter(ds["train"]))  # sample["input_ids.npy"]: a list of ints; sample["json"]["task"]',
        '# ds.with_format("numpy") gives arrays (as int64: cast to int32 before hashing against token_sha256)',
        "",
        "import webdataset as wds",
        'for sample in wds.WebDataset(files["train"], shardshuffle=False).decode():',
        "    ...  # numpy arrays and a dict",
        "",
        "import io, json, tarfile, numpy as np",
        'with tarfile.open(files["train"][0]) as tar:',
        "    for member in tar:  # a sample's members are adjacent; the key is the name up to the first dot",
        '        key, ext = member.name.split(".", 1)',
        "        data = tar.extractfile(member).read()",
        '        value = json.loads(data) if ext == "json" else np.load(io.BytesIO(data), allow_pickle=False)',
        "```",
        "",
        "## Decoding",
        "",
        (
            "The spans say where each modality sits in `input_ids`; `text.npy`, `image.npy` and `audio.npy` hold the "
            "same codes in each tokenizer's own numbering, ready for its decoder. With Lumo and the UTI config of "
            "this run (its token space must have the sha256 above):"
        ),
        "",
        "```python",
        "from lumo_core.uti.unified import UnifiedTokenizer",
        "",
        'tokenizer = UnifiedTokenizer.from_config_path("uti.yaml")',
        'for span in info["spans"]:  # info: the sample\'s json; input_ids: its input_ids.npy',
        '    ids = input_ids[span["start"]:span["end"]]',
        '    if span["modality"] == "text": print(tokenizer.decode_text(ids))',
        '    if span["modality"] == "image": tokenizer.decode_image(ids).save("image.png")',
        '    if span["modality"] == "audio": waveform, rate = tokenizer.decode_audio(ids)',
        "```",
        "",
    ]
    return "\n".join(out).encode("utf-8")


def write_dataset_card(out_dir: Path, card: bytes) -> dict[str, str]:
    """Write the card atomically; returns its index.json entry (name, sha256)."""
    atomic_write_bytes(out_dir / CARD_NAME, card)
    return {"name": CARD_NAME, "sha256": sha256_hex(card)}
