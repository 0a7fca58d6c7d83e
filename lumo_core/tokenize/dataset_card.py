"""The shards folder's README.md: the dataset card that Hugging Face `datasets` reads (the
splits) and a person reads (counts, token layout, sample layout, how to read and decode)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lumo_core.fileio import atomic_write_bytes, sha256_hex
from lumo_core.tokenize.sample_layout import SPLITS

if TYPE_CHECKING:
    from lumo_core.uti.token_space import TokenSpace

CARD_NAME = "README.md"


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
    index: dict[str, Any], space: TokenSpace, task_counts: dict[tuple[str, str], tuple[int, int]], pipeline_version: str
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
