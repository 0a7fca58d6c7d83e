"""Adapters (EnCodec, VQ, SEED, Hugging Face text) and the embedded builtin models they load."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from lumo_core.config import (
    AudioTokenizerConfig,
    ImageTokenizerConfig,
    TextTokenizerConfig,
    TokenizersConfig,
    embedded_path,
    load_uti_config,
)
from lumo_core.errors import AdapterLoadError, ConfigError
from lumo_core.fileio import canonical_json_bytes, sha256_hex
from lumo_core.uti import embedded
from lumo_core.uti.adapters.base import CLIP_MEAN, CLIP_STD, squash_clip_normalise
from lumo_core.uti.adapters.encodec import (
    EncodecAdapter,
    choose_encodec_bandwidth,
    encodec_bandwidth_table,
)
from lumo_core.uti.adapters.factory import (
    build_adapters,
    build_audio_adapter,
    build_image_adapter,
    build_text_adapter,
    check_device,
)
from lumo_core.uti.adapters.seed import SeedImageAdapter
from lumo_core.uti.adapters.testing import (
    DummyAudioAdapter,
    DummyImageAdapter,
    DummyTextAdapter,
)
from lumo_core.uti.adapters.text import HFTextAdapter
from lumo_core.uti.adapters.vq import VQImageAdapter

# The published EnCodec tables: kbps -> codebooks.
TABLE_24KHZ = {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32}
TABLE_48KHZ = {3.0: 2, 6.0: 4, 12.0: 8, 24.0: 16}


def noise(n_samples: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal((channels, n_samples))).astype(np.float32)


def encodec(name: str, bandwidth: float | None = None, n_codebooks: int | None = None) -> EncodecAdapter:
    config = AudioTokenizerConfig(path=f"builtin:{name}", bandwidth=bandwidth, n_codebooks=n_codebooks)
    return build_audio_adapter(config, "cpu")


@pytest.fixture(scope="module")
def codec_24khz() -> EncodecAdapter:
    return encodec("encodec-24khz-tiny", bandwidth=6.0)


@pytest.fixture(scope="module")
def codec_48khz() -> EncodecAdapter:
    return encodec("encodec-48khz-tiny", bandwidth=6.0)


@pytest.fixture(scope="module")
def vq() -> VQImageAdapter:
    return build_image_adapter(ImageTokenizerConfig(path="builtin:vq-tiny"), "cpu")


# ------------------------------------------------------------------ EnCodec: bandwidths
def test_bandwidth_rule_gives_the_published_tables() -> None:
    assert encodec_bandwidth_table([1.5, 3, 6, 12, 24], 75, 1024) == TABLE_24KHZ
    assert encodec_bandwidth_table([3, 6, 12, 24], 150, 1024) == TABLE_48KHZ


@pytest.mark.parametrize(("name", "table"), [("encodec-24khz-tiny", TABLE_24KHZ), ("encodec-48khz-tiny", TABLE_48KHZ)])
def test_every_bandwidth_of_the_real_layouts_emits_its_codebook_count(name: str, table: dict[float, int]) -> None:
    for bandwidth, n_codebooks in table.items():
        codec = encodec(name, bandwidth=bandwidth)
        assert codec.bandwidth_table == table
        assert codec.n_codebooks == n_codebooks
        # transformers treats bandwidth=None as the smallest: the adapter always passes it.
        codes = codec.encode_batch([noise(codec.sample_rate // 20, codec.channels)])[0]
        assert codes.shape == (n_codebooks, codec.n_frames(codec.sample_rate // 20))


def test_codebook_count_alone_picks_its_bandwidth() -> None:
    codec = encodec("encodec-48khz-tiny", n_codebooks=8)
    assert (codec.bandwidth, codec.n_codebooks) == (12.0, 8)


def test_bandwidths_outside_the_table_are_config_errors() -> None:
    with pytest.raises(
        ConfigError, match=r"tokenizers.audio.bandwidth: 5 kbps is not offered by x; it offers 1.5 kbps -> 2 codebooks"
    ):
        choose_encodec_bandwidth(TABLE_24KHZ, 5.0, None, "x")
    with pytest.raises(
        ConfigError, match="tokenizers.audio.n_codebooks: 4 does not match bandwidth 6 kbps of x, which gives 8"
    ):
        choose_encodec_bandwidth(TABLE_24KHZ, 6.0, 4, "x")
    with pytest.raises(ConfigError, match="tokenizers.audio.n_codebooks: 32 is not offered"):
        choose_encodec_bandwidth(TABLE_48KHZ, None, 32, "x")
    with pytest.raises(ConfigError, match="1.5 kbps is not offered by builtin:encodec-48khz-tiny"):
        encodec("encodec-48khz-tiny", bandwidth=1.5)


# ------------------------------------------------------------- EnCodec: shapes, frames
def test_preprocessor_upmixes_mono_for_a_stereo_codec_and_downmixes_for_a_mono_one(
    codec_24khz: EncodecAdapter, codec_48khz: EncodecAdapter
) -> None:
    mono = noise(1600)
    stereo_out = pickle.loads(pickle.dumps(codec_48khz.preprocessor()))(mono, 16000)
    assert stereo_out.shape == (2, 4800)
    assert np.array_equal(stereo_out[0], stereo_out[1])
    stereo = np.stack([np.ones(2400, np.float32), np.zeros(2400, np.float32)])
    mono_out = codec_24khz.preprocess(stereo, 24000)
    assert mono_out.shape == (1, 2400)
    assert np.allclose(mono_out, 0.5)


@pytest.mark.parametrize("n_samples", [1, 319, 320, 321, 7999, 24000, 24001, 36000])
def test_24khz_frames_are_ceil_of_seconds_times_75(codec_24khz: EncodecAdapter, n_samples: int) -> None:
    codes, meta = codec_24khz.encode_batch_with_meta([noise(n_samples)])[0]
    frames = int(np.ceil(n_samples / 24000 * 75 - 1e-9))
    assert codes.shape == (8, frames) == (codec_24khz.n_codebooks, codec_24khz.n_frames(n_samples))
    assert meta == {"frames": frames, "padding_samples": frames * 320 - n_samples}
    assert codes.dtype == np.int64 and codes.min() >= 0 and codes.max() < 1024


def test_48khz_output_is_chunked_and_concatenated_in_time(codec_48khz: EncodecAdapter) -> None:
    half, one, two = codec_48khz.encode_batch_with_meta([noise(24000, 2), noise(48000, 2), noise(96000, 2)])
    assert half[0].shape == (4, 75) and len(half[1]["chunk_scales"]) == 1
    # 1 s: chunks start every 47520 samples (1 % overlap): 150 frames + 2 for the last 480 samples.
    assert one[0].shape == (4, 152)
    assert len(one[1]["chunk_scales"]) == 2 and one[1]["last_chunk_pad_frames"] == 148
    assert one[1]["padding_samples"] == 47520 + 2 * 320 - 48000
    assert two[0].shape == (4, 303) and len(two[1]["chunk_scales"]) == 3
    assert [codec_48khz.n_frames(n) for n in (24000, 48000, 96000)] == [75, 152, 303]


@pytest.mark.parametrize(
    ("fixture", "lengths"),
    [
        ("codec_24khz", [1, 319, 321, 7999, 8000, 8001, 17000, 321]),
        ("codec_48khz", [2400, 9000, 2400, 48500, 9000]),
    ],
)
def test_codes_do_not_depend_on_batch_composition(
    request: pytest.FixtureRequest, fixture: str, lengths: list[int]
) -> None:
    codec = request.getfixturevalue(fixture)
    waves = [noise(n, codec.channels, seed=i) for i, n in enumerate(lengths)]
    together = codec.encode_batch_with_meta(waves)
    alone = [codec.encode_batch_with_meta([wave])[0] for wave in waves]
    for (codes_a, meta_a), (codes_b, meta_b) in zip(together, alone):
        assert np.array_equal(codes_a, codes_b)
        assert meta_a == meta_b
    reversed_order = codec.encode_batch(waves[::-1])[::-1]
    assert all(np.array_equal(a, b) for a, b in zip(reversed_order, (c for c, _ in alone)))


def test_decoding_trims_to_the_source_length(codec_24khz: EncodecAdapter, codec_48khz: EncodecAdapter) -> None:
    codes = codec_24khz.encode_batch([noise(5000)])[0]
    trimmed, full = codec_24khz.decode_batch([codes, codes], n_samples=[5000, None])
    assert trimmed.shape == (1, 5000)
    assert full.shape == (1, 16 * 320)
    assert np.array_equal(full[:, :5000], trimmed)
    ((codes, meta),) = codec_48khz.encode_batch_with_meta([noise(50000, 2)])
    wave = codec_48khz.decode_batch([codes], n_samples=[50000], scales=[meta["chunk_scales"]])[0]
    assert wave.shape == (2, 50000) and np.isfinite(wave).all()
    assert (
        codec_48khz.decode_batch([codes])[0].shape
        == (2, codec_48khz.covered_samples(codes.shape[1]))
        == (2, 50000 + meta["padding_samples"])
    )


def test_rows_per_call_is_the_fixed_batch_shape(codec_24khz: EncodecAdapter, codec_48khz: EncodecAdapter) -> None:
    """Callers hand over at most `rows_per_call` inputs of one batch key per call: the 24 kHz
    codec batches length buckets at its batch size; the 48 kHz one sees its padding, so one."""
    assert (codec_24khz.rows_per_call, codec_48khz.rows_per_call) == (8, 1)
    single = build_audio_adapter(
        AudioTokenizerConfig(path="builtin:encodec-24khz-tiny", bandwidth=6.0), "cpu", batch_size=1
    )
    assert single.rows_per_call == 1
    # The token space does not depend on the batch shape: one token space for every device.
    assert single.describe() == codec_24khz.describe()
    assert build_image_adapter(ImageTokenizerConfig(path="builtin:vq-tiny"), "cpu", batch_size=3).rows_per_call == 3
    assert DummyAudioAdapter().rows_per_call == DummyImageAdapter().rows_per_call == 1


def test_audio_describe_has_what_the_token_space_needs(codec_24khz: EncodecAdapter) -> None:
    described = codec_24khz.describe()
    assert {
        k: described[k] for k in ("codec", "sample_rate", "channels", "frame_rate", "n_codebooks", "codebook_size")
    } == {
        "codec": "builtin:encodec-24khz-tiny@v1",
        "sample_rate": 24000,
        "channels": 1,
        "frame_rate": 75,
        "n_codebooks": 8,
        "codebook_size": 1024,
    }
    assert described["tokens_per_second"] == 600
    json.dumps(described)


# ---------------------------------------------------------------------------- VQ images
def test_vq_sizes_come_from_the_model_config(vq: VQImageAdapter) -> None:
    assert (vq.codebook_size, vq.tokens_per_image, vq.resolution, vq.latent_grid) == (512, 64, (32, 32), (8, 8))
    described = vq.describe()
    assert {k: described[k] for k in ("tokenizer", "codebook_size", "tokens_per_image", "resolution")} == {
        "tokenizer": "builtin:vq-tiny@v1",
        "codebook_size": 512,
        "tokens_per_image": 64,
        "resolution": [32, 32],
    }


def test_vq_preprocessing_centre_crops_then_scales_to_unit_range(vq: VQImageAdapter) -> None:
    from PIL import Image

    # 96x32: blue | red | green thirds; the centre crop keeps only the red third.
    pixels = np.zeros((32, 96, 3), dtype=np.uint8)
    pixels[:, :32, 2] = pixels[:, 32:64, 0] = pixels[:, 64:, 1] = 255
    out = pickle.loads(pickle.dumps(vq.preprocessor()))(Image.fromarray(pixels))
    assert out.shape == (3, 32, 32) and out.dtype == np.float32
    assert np.allclose(out[0], 1.0) and np.allclose(out[1:], -1.0)


def test_vq_codes_do_not_depend_on_batch_composition(vq: VQImageAdapter) -> None:
    pixels = np.random.default_rng(0).uniform(-1, 1, (5, 3, 32, 32)).astype(np.float32)
    together = vq.encode_batch(pixels)
    alone = np.concatenate([vq.encode_batch(pixels[i : i + 1]) for i in range(5)])
    assert together.shape == (5, 64) and np.array_equal(together, alone)
    assert len(np.unique(together)) > 64


def test_vq_decodes_through_either_codebook_lookup_path(vq: VQImageAdapter, tmp_path: Path) -> None:
    codes = vq.encode_batch(np.random.default_rng(1).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32))
    images = vq.decode_batch(codes)
    assert [(im.size, im.mode) for im in images] == [((32, 32), "RGB")] * 2
    # aMUSEd's checkpoints look codes up inside VQModel.decode: same weights, same pictures.
    source = Path(embedded.resolve_model_path("builtin:vq-tiny"))
    lookup = tmp_path / "vq-lookup"
    shutil.copytree(source, lookup)
    config = json.loads((lookup / "config.json").read_text())
    (lookup / "config.json").write_text(json.dumps({**config, "lookup_from_codebook": True}))
    other = VQImageAdapter(str(lookup), "lookup", "cpu")
    assert other.model.config.lookup_from_codebook
    assert [np.asarray(a).tobytes() for a in other.decode_batch(codes)] == [np.asarray(b).tobytes() for b in images]


def test_vq_resolution_override() -> None:
    path = embedded.resolve_model_path("builtin:vq-tiny")
    larger = VQImageAdapter(path, "vq", "cpu", resolution=48)
    assert larger.tokens_per_image == 144
    assert larger.encode_batch(np.zeros((1, 3, 48, 48), np.float32)).shape == (1, 144)
    with pytest.raises(
        ConfigError, match="tokenizers.image.resolution: 30 px is not a multiple of the downsampling factor 4"
    ):
        VQImageAdapter(path, "vq", "cpu", resolution=30)


# ------------------------------------------------------------------------------- text
def test_hf_text_adapter_ids_have_no_specials_and_round_trip() -> None:
    text = build_text_adapter(TextTokenizerConfig(path="builtin:bpe-tiny"))
    assert isinstance(text, HFTextAdapter)
    assert text.vocab_size == len(text.tokenizer) == 1024
    sentence = "A red circle, then a C major chord for 1.5 seconds. Ünïcode ✓"
    ids = text.encode(sentence)
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < 1024
    assert text.tokenizer.convert_tokens_to_ids("<|endoftext|>") not in ids.tolist()
    assert text.decode(ids) == sentence
    described = text.describe()
    assert described["vocab_sha256"] == sha256_hex(canonical_json_bytes(text.tokenizer.get_vocab()))


# ----------------------------------------------------------------------- load errors
def test_missing_or_empty_model_folders_are_load_errors(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere")
    with pytest.raises(AdapterLoadError, match=f"text tokenizer: {missing} is not a folder"):
        HFTextAdapter(missing, "t")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AdapterLoadError, match=f"cannot load the audio codec from {empty}"):
        EncodecAdapter(str(empty), "a", 6.0, None, "cpu")
    with pytest.raises(AdapterLoadError, match=f"cannot load the VQ image tokenizer from {empty}"):
        VQImageAdapter(str(empty), "i", "cpu")


def test_seed_without_its_code_or_checkpoint_fails_at_load_naming_every_path(tmp_path: Path) -> None:
    code = tmp_path / "AnyGPT"
    checkpoint = tmp_path / "seed-tokenizer-2"
    with pytest.raises(AdapterLoadError) as caught:
        SeedImageAdapter(str(checkpoint), "seed", "cpu", str(code), str(tmp_path / "unclip"), "bicubic")
    message = str(caught.value)
    for looked_at in [
        checkpoint,
        checkpoint / "seed_quantizer.pt",
        code / "seed2/seed_qformer/qformer_quantizer.py",
        tmp_path / "seed2/seed_qformer/qformer_quantizer.py",
        tmp_path / "unclip" / "model_index.json",
    ]:
        assert str(looked_at) in message
    checkpoint.mkdir()
    (checkpoint / "seed_quantizer.pt").write_bytes(b"")
    with pytest.raises(AdapterLoadError) as caught:
        build_image_adapter(ImageTokenizerConfig(kind="seed", path=str(checkpoint), model_code_path=str(code)), "cpu")
    assert "SEED model code" in str(caught.value) and "seed_quantizer.pt" not in str(caught.value)
    with pytest.raises(AdapterLoadError, match="model_code_path is not set"):
        build_image_adapter(ImageTokenizerConfig(kind="seed", path=str(checkpoint)), "cpu")


FAKE_SEED_CODE = """
import colorsys
import torch

SHADOWED = colorsys.__file__


class Blip2QformerQuantizer(torch.nn.Module):
    @classmethod
    def from_pretrained(cls, pretrained_model_path, vit_precision):
        return cls()

    def get_codebook_indices(self, pixels):
        return torch.zeros(pixels.shape[0], 32, dtype=torch.long), None
"""


def test_seed_code_goes_at_the_end_of_sys_path_and_its_checkpoint_names_the_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkout's folder never shadows an installed module: its own `colorsys.py` is not the
    one the SEED code imports. The checkpoint's sha256 is in the description."""
    code = tmp_path / "AnyGPT"
    (code / "seed2" / "seed_qformer").mkdir(parents=True)
    (code / "seed2" / "seed_qformer" / "qformer_quantizer.py").write_text(FAKE_SEED_CODE)
    (code / "colorsys.py").write_text("raise ImportError('the checkout shadowed the standard library')\n")
    checkpoint = tmp_path / "seed-tokenizer-2"
    checkpoint.mkdir()
    (checkpoint / "seed_quantizer.pt").write_bytes(b"weights v1")
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("colorsys", "seed2", "seed2.seed_qformer", "seed2.seed_qformer.qformer_quantizer"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    adapter = SeedImageAdapter(str(checkpoint), "seed", "cpu", str(code), None, "bicubic")
    assert sys.path[-1] == str(code)
    assert not sys.modules["seed2.seed_qformer.qformer_quantizer"].SHADOWED.startswith(str(code))
    digest = hashlib.sha256(b"weights v1").hexdigest()
    assert adapter.describe()["weights"] == {
        "sha256": sha256_hex(canonical_json_bytes({"seed_quantizer.pt": digest})),
        "files": {"seed_quantizer.pt": digest},
    }


def test_seed_preprocessing_squashes_to_224_with_clip_normalisation() -> None:
    from PIL import Image

    # 448x224: left half red, right half blue; the aspect ratio is NOT kept, so both halves stay.
    pixels = np.zeros((224, 448, 3), dtype=np.uint8)
    pixels[:, :224, 0] = 255
    pixels[:, 224:, 2] = 255
    out = squash_clip_normalise(Image.fromarray(pixels), size=(224, 224), resample="bicubic")
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    mean, std = np.asarray(CLIP_MEAN), np.asarray(CLIP_STD)
    assert np.allclose(out[:, :, :100].mean(axis=(1, 2)), (np.array([1, 0, 0]) - mean) / std, atol=1e-5)
    assert np.allclose(out[:, :, 124:].mean(axis=(1, 2)), (np.array([0, 0, 1]) - mean) / std, atol=1e-5)
    bilinear = squash_clip_normalise(Image.fromarray(pixels), size=(224, 224), resample="bilinear")
    assert not np.array_equal(bilinear, out)


# -------------------------------------------------------------------- building adapters
def test_dummy_kinds_build_model_free_adapters() -> None:
    config = TokenizersConfig(
        text=TextTokenizerConfig(kind="dummy", vocab_size=300),
        image=ImageTokenizerConfig(kind="dummy", codebook_size=16, tokens_per_image=4, resolution=8),
        audio=AudioTokenizerConfig(
            kind="dummy", codebook_size=8, n_codebooks=3, sample_rate=4000, channels=2, frame_rate=40
        ),
    )
    text, image, audio = build_adapters(config, "cpu")
    assert isinstance(text, DummyTextAdapter) and text.vocab_size == 300
    assert isinstance(image, DummyImageAdapter) and (image.codebook_size, image.tokens_per_image, image.resolution) == (
        16,
        4,
        (8, 8),
    )
    assert isinstance(audio, DummyAudioAdapter) and (
        audio.n_codebooks,
        audio.sample_rate,
        audio.channels,
        audio.frame_rate,
    ) == (3, 4000, 2, 40)


def test_cuda_without_a_gpu_is_a_config_error() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(ConfigError, match="pipeline.device: 'cuda' was asked for but torch sees no CUDA device"):
        check_device("cuda")


# ---------------------------------------------------------------------- builtin models
def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("name", ["bpe-tiny", "vq-tiny", "encodec-24khz-tiny"])
def test_builtins_rebuild_byte_identical(name: str, tmp_path: Path) -> None:
    cached = Path(embedded.resolve_model_path(f"builtin:{name}"))
    embedded.build_builtin(name, tmp_path)
    assert file_hashes(tmp_path) == file_hashes(cached)


def test_concurrent_first_use_builds_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LUMO_CACHE_DIR", str(tmp_path))
    real = embedded.BUILTINS["bpe-tiny"]
    builds = []

    def counted_build(settings: object, target: Path) -> None:
        builds.append(target)
        real.build(settings, target)

    monkeypatch.setitem(
        embedded.BUILTINS, "bpe-tiny", embedded.Builtin(real.revision, real.model_config, counted_build)
    )
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(embedded.resolve_model_path("builtin:bpe-tiny")))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    final = tmp_path / "builtin" / "bpe-tiny-v1"
    assert results == [str(final)] * 4
    assert len(builds) == 1
    assert sorted(p.name for p in (tmp_path / "builtin").iterdir()) == [".bpe-tiny-v1.lock", "bpe-tiny-v1"]
    assert (final / "tokenizer.json").is_file()


def test_failed_build_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LUMO_CACHE_DIR", str(tmp_path))

    def failing_build(settings: object, target: Path) -> None:
        (target / "partial.bin").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setitem(embedded.BUILTINS, "vq-tiny", embedded.Builtin(1, dict, failing_build))
    with pytest.raises(RuntimeError, match="disk full"):
        embedded.resolve_model_path("builtin:vq-tiny")
    assert sorted(p.name for p in (tmp_path / "builtin").iterdir()) == [".vq-tiny-v1.lock"]


def test_builtin_names_and_identities(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown builtin model 'builtin:nope'; known: .*'builtin:vq-tiny'"):
        embedded.resolve_model_path("builtin:nope")
    assert embedded.resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert embedded.model_identity("builtin:vq-tiny") == "builtin:vq-tiny@v1"
    (tmp_path / "facebook" / "encodec_24khz").mkdir(parents=True)
    assert embedded.model_identity(str(tmp_path / "facebook" / "encodec_24khz")) == "facebook/encodec_24khz"
    assert embedded.model_identity("facebook/encodec_48khz") == "facebook/encodec_48khz"


def test_full_size_builtins_have_the_published_sizes_without_building() -> None:
    encodec_config = embedded.builtin_spec("builtin:encodec-24khz-full")[1].model_config()
    assert (encodec_config.sampling_rate, encodec_config.frame_rate, encodec_config.codebook_size) == (24000, 75, 1024)
    assert (
        encodec_bandwidth_table(
            list(encodec_config.target_bandwidths), encodec_config.frame_rate, encodec_config.codebook_size
        )
        == TABLE_24KHZ
    )
    vq_config = embedded.builtin_spec("builtin:vq-amused-256-full")[1].model_config()
    downsample = 2 ** (len(vq_config["block_out_channels"]) - 1)
    assert (vq_config["num_vq_embeddings"], downsample, (vq_config["sample_size"] // downsample) ** 2) == (
        8192,
        16,
        256,
    )
    bench = load_uti_config(embedded_path("configs/bench_full.yaml"))
    assert (bench.tokenizers.audio.path, bench.tokenizers.image.path) == (
        "builtin:encodec-24khz-full",
        "builtin:vq-amused-256-full",
    )


@pytest.mark.parametrize("name", ["anygpt_encodec24k_seed", "encodec48k_vqgan", "bench_full"])
def test_example_configs_validate(name: str) -> None:
    config = load_uti_config(embedded_path(f"configs/{name}.yaml"))
    for section in (config.tokenizers.text, config.tokenizers.image, config.tokenizers.audio):
        if embedded.is_builtin(section.path):
            embedded.builtin_spec(section.path)


# ---------------------------------------------------------------------- package layout
@pytest.mark.parametrize("module", ["base", "text", "encodec", "vq", "seed", "testing", "factory"])
def test_each_adapter_module_imports_alone_without_heavy_libraries(module: str) -> None:
    code = (
        "import importlib, sys\n"
        f"importlib.import_module('lumo_core.uti.adapters.{module}')\n"
        "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_package_re_exports_its_public_names() -> None:
    import lumo_core.uti.adapters as package
    from lumo_core.uti.adapters import base, factory, testing

    assert package.build_adapters is factory.build_adapters and package.pad_rows is base.pad_rows
    assert (package.TextAdapter, package.ImageAdapter, package.AudioAdapter) == (
        base.TextAdapter,
        base.ImageAdapter,
        base.AudioAdapter,
    )
    assert package.DummyTextAdapter is testing.DummyTextAdapter is DummyTextAdapter
    assert all(hasattr(package, name) for name in package.__all__)
