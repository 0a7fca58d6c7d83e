"""The shards read whole by the readers users reach for: Hugging Face `datasets` (map-style,
streaming, and the shards folder alone through its dataset card), `webdataset` with `.decode()`,
and plain `tarfile` + numpy.

Every reader must give every sample of every split with every member and every JSON field:
`datasets` infers one schema from the first samples of the first shard, so a member or a JSON
field that only later samples carry would be dropped without a word (issue 13). Local files only:
no hub, no network.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
import yaml
from PIL import Image

from lumo_core.tokenize.dataset_card import CARD_NAME
from lumo_core.tokenize.sample_layout import MEDIA_FIELDS, SAMPLE_MEMBERS, SPLITS
from lumo_core.uti.token_space import TokenSpace
from tests.manifests import write_hostile_manifest
from tests.tokenize.test_tokenization import DUMMY_CONFIG, HOSTILE_CONFIG, tokenize_in_process

MANIFEST_KEYS = {"id", "task", "text", "image", "audio"}
IMAGE_TASKS = ("t2i", "i2t")
CONTRACT_FIELDS = {"id", "task", "split", "token_sha256", "spans", "token_space_sha256"}


# ------------------------------------------------------------------------------- setup
@pytest.fixture(scope="module", autouse=True)
def hf_offline(tmp_path_factory) -> Iterator[Path]:
    """Hugging Face libraries offline, with a cache of this module's own: set before `datasets`
    is imported (it reads them at import), and patched where an earlier import read them."""
    home = tmp_path_factory.mktemp("hf")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (
            ("HF_DATASETS_OFFLINE", "1"),
            ("HF_HUB_OFFLINE", "1"),
            ("HF_HOME", str(home)),
            ("HF_DATASETS_CACHE", str(home / "datasets")),
            ("HF_HUB_DISABLE_TELEMETRY", "1"),
        ):
            patch.setenv(name, value)
        import datasets
        import huggingface_hub.constants

        patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        datasets.disable_progress_bars()
        yield home


class Built:
    """A tokenized shards folder and what a reader's result is checked against."""

    def __init__(self, out: Path, manifest: Path) -> None:
        self.root = out / "tokenized_shards"
        self.index = json.loads((self.root / "index.json").read_bytes())
        self.space = TokenSpace.read(out / "token_space")
        self.truth = {split: tar_samples(self.shard_files(split)) for split in SPLITS}
        # id -> the manifest row's own keys (the sample's metadata_json)
        self.extras = {}
        for line in manifest.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("id"), str):
                self.extras.setdefault(row["id"], {k: v for k, v in row.items() if k not in MANIFEST_KEYS})

    def shard_files(self, split: str) -> list[str]:
        return [str(self.root / shard["name"]) for shard in self.index["splits"][split]["shards"]]


def _build(tmp_path_factory, name: str, write_manifest: Callable[[Path], Path]) -> Built:
    base = tmp_path_factory.mktemp(name)
    config = base / "uti.yaml"
    config.write_text(HOSTILE_CONFIG if write_manifest is _hostile_manifest else DUMMY_CONFIG)
    manifest = write_manifest(base / "data")
    tokenize_in_process(base / "out", manifest, config)
    return Built(base / "out", manifest)


def _embedded_manifest(directory: Path) -> Path:
    from lumo_core.sample_data import ensure_sample_manifest

    return ensure_sample_manifest(directory)


def _hostile_manifest(directory: Path) -> Path:
    return write_hostile_manifest(directory)[0]


def _audio_first_manifest(directory: Path) -> Path:
    """Audio rows first, then image rows; only the image rows carry extra keys, of changing
    types. The audio ids sort first and there are enough of them that the first shard of each
    split holds only audio samples: `datasets` infers its schema from those (the first 5 samples
    of one split's first shard)."""
    from lumo_core.config import UTIConfig
    from lumo_core.uti.sequences import split_of

    split = UTIConfig.model_validate(yaml.safe_load(DUMMY_CONFIG)).split
    per_shard = yaml.safe_load(DUMMY_CONFIG)["shards"]["max_samples_per_shard"]
    media = directory / "media"
    media.mkdir(parents=True, exist_ok=True)
    rows = []
    audio_per_split = dict.fromkeys(SPLITS, 0)
    while min(audio_per_split.values()) < per_shard:
        index = len(rows)
        sample_id = f"a{index:03d}-audio"
        audio_per_split[split_of(sample_id, split.salt, split.eval_fraction)] += 1
        t = np.arange(2000 + 40 * index) / 8000
        soundfile.write(
            media / f"{sample_id}.wav",
            (0.3 * np.sin(2 * np.pi * (200 + 10 * index) * t)).astype(np.float32),
            8000,
            subtype="PCM_16",
        )
        rows.append(
            {
                "id": sample_id,
                "task": ("a2t", "t2a")[index % 2],
                "text": f"A tone number {index}.",
                "audio": f"media/{sample_id}.wav",
            }
        )
    for index in range(12):
        sample_id = f"b{index:03d}-image"
        Image.new("RGB", (20 + index, 12 + index), (20 * index, 80, 160)).save(media / f"{sample_id}.png")
        extra = (
            {"rating": index}
            if index % 2
            else {"rating": f"{index} stars", "tags": ["x", {"nested": None}], "score": 0.5 + index}
        )
        rows.append(
            {
                "id": sample_id,
                "task": IMAGE_TASKS[index % 2],
                "text": f"A rectangle number {index}.",
                "image": f"media/{sample_id}.png",
                **extra,
            }
        )
    manifest = directory / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return manifest


BUILDS = {"embedded": _embedded_manifest, "hostile": _hostile_manifest, "audio_first": _audio_first_manifest}


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> Callable[[str], Built]:
    """Each manifest tokenized once for the module, on first use."""
    done: dict[str, Built] = {}

    def get(name: str) -> Built:
        if name not in done:
            done[name] = _build(tmp_path_factory, name, BUILDS[name])
        return done[name]

    return get


@pytest.fixture(scope="module", params=sorted(BUILDS))
def built(request, builds) -> Built:
    return builds(request.param)


# ------------------------------------------------------------------------------ readers
def tar_samples(paths: list[str]) -> list[dict[str, Any]]:
    """Plain tarfile + numpy, as the README shows it: a sample's members are adjacent, the key is
    the member name up to the first dot."""
    samples: list[dict[str, Any]] = []
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                if not samples or samples[-1]["__key__"] != key:
                    samples.append({"__key__": key})
                samples[-1][ext] = json.loads(data) if ext == "json" else np.load(io.BytesIO(data), allow_pickle=False)
    return samples


def _from_datasets(row: dict[str, Any]) -> dict[str, Any]:
    """A `datasets` row: its arrays are (nested) lists of ints; the feature types say int32."""
    sample = {"__key__": row["__key__"]}
    for name, value in row.items():
        if not name.startswith("__"):
            sample[name] = np.asarray(value, dtype=np.int32) if name.endswith(".npy") else value
    return sample


def _innermost_dtype(feature: Any) -> str:
    while not hasattr(feature, "dtype") or feature.dtype == "list":
        feature = feature.feature
    return feature.dtype


def _check_datasets_features(dataset: Any) -> None:
    features = dataset.features
    assert features is not None and set(SAMPLE_MEMBERS) <= set(features), features
    for name in SAMPLE_MEMBERS:
        if name.endswith(".npy"):
            assert _innermost_dtype(features[name]) == "int32", (name, features[name])


def read_datasets(built: Built, cache: Path, streaming: bool) -> dict[str, list[dict[str, Any]]]:
    from datasets import load_dataset

    files = {split: built.shard_files(split) for split in SPLITS if built.shard_files(split)}
    loaded = load_dataset("webdataset", data_files=files, streaming=streaming, cache_dir=str(cache))
    result = {split: [] for split in SPLITS}
    for split in files:
        if not streaming:
            _check_datasets_features(loaded[split])
        result[split] = [_from_datasets(row) for row in loaded[split]]
    return result


def read_datasets_folder(built: Built, cache: Path) -> dict[str, list[dict[str, Any]]]:
    from datasets import load_dataset

    loaded = load_dataset(str(built.root), cache_dir=str(cache))
    assert set(loaded) == {split for split in SPLITS if built.shard_files(split)}
    for split in loaded:
        _check_datasets_features(loaded[split])
    return {split: [_from_datasets(row) for row in loaded[split]] if split in loaded else [] for split in SPLITS}


def read_webdataset(built: Built, cache: Path) -> dict[str, list[dict[str, Any]]]:
    import webdataset

    result = {}
    for split in SPLITS:
        files = built.shard_files(split)
        dataset = webdataset.WebDataset(files, shardshuffle=False, empty_check=False).decode() if files else []
        result[split] = [
            {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")} for sample in dataset
        ]
    return result


def read_tarfile(built: Built, cache: Path) -> dict[str, list[dict[str, Any]]]:
    return {split: tar_samples(built.shard_files(split)) for split in SPLITS}


READERS: dict[str, Callable[[Built, Path], dict[str, list[dict[str, Any]]]]] = {
    "datasets": lambda built, cache: read_datasets(built, cache, streaming=False),
    "datasets_streaming": lambda built, cache: read_datasets(built, cache, streaming=True),
    "datasets_folder_card": read_datasets_folder,
    "webdataset_decode": read_webdataset,
    "tarfile_numpy": read_tarfile,
}


# ------------------------------------------------------------------------------- checks
def assert_same_value(got: Any, want: Any, where: str) -> None:
    """Equal, and of the same JSON type at every leaf (an int where the tar holds a float is a
    truncation, a missing key a dropped field)."""
    if isinstance(want, dict):
        assert isinstance(got, dict), f"{where}: {got!r} is not an object"
        assert set(got) == set(want), f"{where}: fields {sorted(got)} != {sorted(want)}"
        for key in want:
            assert_same_value(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got!r} != {want!r}"
        for position, (g, w) in enumerate(zip(got, want)):
            assert_same_value(g, w, f"{where}[{position}]")
    else:
        assert type(got) is type(want) and got == want, (
            f"{where}: {got!r} ({type(got).__name__}) != {want!r} ({type(want).__name__})"
        )


def check_sample(sample: dict[str, Any], built: Built, where: str) -> None:
    space = built.space
    assert set(sample) - {"__key__"} == set(SAMPLE_MEMBERS), f"{where}: members {sorted(sample)}"
    info = sample["json"]
    assert CONTRACT_FIELDS <= set(info), f"{where}: json fields {sorted(info)}"
    assert set(info["media"]) == set(MEDIA_FIELDS) and all(
        set(info["media"][m]) == set(MEDIA_FIELDS[m]) for m in MEDIA_FIELDS
    ), f"{where}: media {info['media']}"
    assert info["token_space_sha256"] == built.index["token_space_sha256"]
    input_ids, labels = sample["input_ids.npy"], sample["labels.npy"]
    assert input_ids.ndim == 1 and labels.shape == input_ids.shape and input_ids.size == info["n_tokens"]
    assert hashlib.sha256(np.asarray(input_ids, dtype="<i4").tobytes()).hexdigest() == info["token_sha256"], where
    spans = {span["modality"]: input_ids[span["start"] : span["end"]] for span in info["spans"]}
    assert np.array_equal(space.text_from_global(spans["text"]), sample["text.npy"]), where
    image, audio = sample["image.npy"], sample["audio.npy"]
    if info["task"] in IMAGE_TASKS:
        assert image.shape == (space.tokens_per_image,), f"{where}: image codes {image.shape}"
        assert np.array_equal(space.image_from_global(spans["image"]), image), where
        assert audio.shape == (space.n_audio_codebooks, 0), f"{where}: audio codes of an image task {audio.shape}"
        assert info["media"]["image"]["source_sha256"] and info["media"]["image"]["tokens"] == image.size
    else:
        frames = info["media"]["audio"]["frames"]
        assert frames > 0 and audio.shape == (space.n_audio_codebooks, frames), (
            f"{where}: audio codes {audio.shape}, {frames} frames"
        )
        assert np.array_equal(space.audio_from_global(spans["audio"]), audio), where
        assert image.shape == (0,), f"{where}: image codes of an audio task {image.shape}"
        assert info["media"]["audio"]["source_sha256"]
    assert json.loads(info["metadata_json"]) == built.extras[info["id"]], where


@pytest.mark.parametrize("reader", sorted(READERS))
def test_every_sample_arrives_whole(reader, built, tmp_path):
    samples = READERS[reader](built, tmp_path / "cache")
    for split in SPLITS:
        got, want = samples[split], built.truth[split]
        assert len(got) == built.index["splits"][split]["n_samples"] == len(want), (
            f"{reader} {split}: {len(got)} samples"
        )
        by_key = {sample["__key__"]: sample for sample in got}
        assert sorted(by_key) == sorted(sample["__key__"] for sample in want)
        for expected in want:
            where = f"{reader} {split} {expected['__key__']}"
            sample = by_key[expected["__key__"]]
            check_sample(sample, built, where)
            assert sample["json"]["split"] == split
            assert_same_value(sample["json"], expected["json"], f"{where} json")
            for name in SAMPLE_MEMBERS:
                if name.endswith(".npy"):
                    assert sample[name].shape == expected[name].shape and np.array_equal(
                        sample[name], expected[name]
                    ), f"{where} {name}"
    n_tasks = {sample["json"]["task"] for split in SPLITS for sample in samples[split]}
    assert n_tasks == {"t2i", "i2t", "t2a", "a2t"}


def test_audio_first_shards_hold_only_audio(builds):
    """The case that lost every image before: the first shard of each split, from which
    `datasets` infers the schema, has no image sample and no extra key."""
    built = builds("audio_first")
    for split in SPLITS:
        first = tar_samples(built.shard_files(split)[:1])
        assert len(first) >= 5 and all(
            s["json"]["task"] in ("a2t", "t2a") and s["json"]["metadata_json"] == "{}" for s in first
        )
        assert any(s["json"]["task"] in IMAGE_TASKS and s["json"]["metadata_json"] != "{}" for s in built.truth[split])


def test_dataset_card_is_written_before_the_index_and_listed(tmp_path, monkeypatch):
    from lumo_core.tokenize import merge as tokenize_merge

    seen = []
    original = tokenize_merge.write_index

    def write_index(out_dir: Path, index: dict[str, Any]) -> str:
        card = out_dir / CARD_NAME
        seen.append(card.is_file() and not (out_dir / "index.json").exists())
        assert index["card"] == {"name": CARD_NAME, "sha256": hashlib.sha256(card.read_bytes()).hexdigest()}
        return original(out_dir, index)

    monkeypatch.setattr(tokenize_merge, "write_index", write_index)
    built = _build(_Factory(tmp_path), "card", _hostile_manifest)
    assert seen == [True]
    card = (built.root / CARD_NAME).read_text(encoding="utf-8")
    header = card.split("---\n")[1]
    assert (
        "configs:" in header
        and "- split: train\n    path: train/shard-*.tar" in header
        and "- split: eval\n    path: eval/shard-*.tar" in header
    )
    assert built.index["token_space_sha256"] in card
    for split in SPLITS:
        tasks: dict[str, list[int]] = {}
        for sample in built.truth[split]:
            counts = tasks.setdefault(sample["json"]["task"], [0, 0])
            counts[0] += 1
            counts[1] += sample["json"]["n_tokens"]
        for task, (n, tokens) in tasks.items():
            assert f"| {split} | {task} | {n} | {tokens} |" in card
        assert (
            f"| {split} | all | {built.index['splits'][split]['n_samples']} | {built.index['splits'][split]['n_tokens']} |"
            in card
        )


def test_a_split_without_samples_is_left_out_of_the_card(tmp_path):
    """A pattern that matches no shard would fail the whole folder load: the card names only
    the splits that have shards."""
    from lumo_core.config import UTIConfig
    from lumo_core.uti.sequences import split_of

    split = UTIConfig.model_validate(yaml.safe_load(DUMMY_CONFIG)).split

    def train_only(directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        ids = [f"only-{n}" for n in range(40) if split_of(f"only-{n}", split.salt, split.eval_fraction) == "train"][:2]
        Image.new("RGB", (16, 16), (200, 10, 10)).save(directory / "red.png")
        rows = [{"id": sample_id, "task": "t2i", "text": "A red square.", "image": "red.png"} for sample_id in ids]
        manifest = directory / "manifest.jsonl"
        manifest.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        return manifest

    built = _build(_Factory(tmp_path), "train_only", train_only)
    assert built.index["splits"]["eval"]["n_shards"] == 0 and built.index["splits"]["train"]["n_samples"] == 2
    header = (built.root / CARD_NAME).read_text(encoding="utf-8").split("---\n")[1]
    assert "split: train" in header and "split: eval" not in header
    samples = read_datasets_folder(built, tmp_path / "cache")
    assert len(samples["train"]) == 2 and samples["eval"] == []


def test_media_facts_have_one_schema():
    from lumo_core.tokenize.sample_layout import sample_media

    audio = {
        "source_sample_rate": 48000,
        "source_channels": 2,
        "duration_s": 2,
        "source_sha256": "ab",
        "sample_rate": 48000,
        "frames": 150,
        "padding_samples": 0,
        "chunk_scales": [0.25, 0.5],
        "last_chunk_pad_frames": 3,
    }
    media = sample_media("audio", audio)
    # The codec's own facts (chunked EnCodec) travel as JSON text; a whole-number duration stays a float.
    assert json.loads(media["audio"]["codec_json"]) == {"chunk_scales": [0.25, 0.5], "last_chunk_pad_frames": 3}
    assert type(media["audio"]["duration_s"]) is float and media["image"] == MEDIA_FIELDS["image"]
    image = sample_media("image", {"source_width": 3, "source_height": 4, "source_sha256": "cd", "tokens": 16})
    assert image["audio"] == MEDIA_FIELDS["audio"] and image["image"]["tokens"] == 16
    with pytest.raises(ValueError, match="not in the shard schema"):
        sample_media("image", {"source_width": 3, "source_height": 4, "source_sha256": "cd", "tokens": 16, "exif": {}})
    with pytest.raises(ValueError, match="lack"):
        sample_media("image", {"source_width": 3})


class _Factory:
    """tmp_path_factory's mktemp on a function's tmp_path."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def mktemp(self, name: str) -> Path:
        path = self.root / name
        path.mkdir()
        return path
