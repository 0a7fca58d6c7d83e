"""UnifiedTokenizer on the embedded default config: encode/decode per modality, the token space
it lays out, runtime sizes, determinism across processes and every kind of bad input."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from PIL import Image

from lumo_core.config import UTIConfig, load_uti_config
from lumo_core.errors import (
    AudioTooLongError,
    EmptyAudioError,
    ImageTooLargeError,
    MissingFileError,
    TextTooLongError,
    TokenSpaceError,
    TruncatedMediaError,
    UnreadableMediaError,
)
from lumo_core.fileio import file_sha256
from lumo_core.uti.token_space import AUDIO, IMAGE, TEXT, TokenSpace
from lumo_core.uti.unified import UnifiedTokenizer

SENTENCE = "A red circle above a blue square, then a C major chord for one second."


def config_with(**sections: dict[str, Any]) -> UTIConfig:
    """The embedded default config with some sections partly replaced."""
    data = load_uti_config(None).model_dump()
    for name, values in sections.items():
        data[name] = {**data[name], **values}
    return UTIConfig.model_validate(data)


def picture(width: int = 48, height: int = 40) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels)


def chord(seconds: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (sum(np.sin(2 * np.pi * f * t) for f in (261.6, 329.6, 392.0)) / 4).astype(np.float32)


@pytest.fixture(scope="module")
def tokenizer() -> UnifiedTokenizer:
    return UnifiedTokenizer.from_config_path(None)


@pytest.fixture(scope="module")
def strict() -> UnifiedTokenizer:
    """Same models; low limits and small batches."""
    return UnifiedTokenizer(
        config_with(
            limits={"max_image_pixels": 1000, "max_audio_seconds": 0.3, "max_text_tokens": 5},
            pipeline={"image_batch_size": 2, "audio_batch_size": 2},
        )
    )


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("media")
    image, audio = folder / "picture.png", folder / "chord.wav"
    picture().save(image, format="PNG")
    soundfile.write(str(audio), chord(0.3), 16000, subtype="FLOAT")
    return {"image": image, "audio": audio}


# ----------------------------------------------------------------------- token space
def test_token_space_records_what_decides_each_modalitys_ids(tokenizer: UnifiedTokenizer) -> None:
    space = tokenizer.token_space
    assert {k: space.text[k] for k in ("tokenizer", "vocab_size")} == {
        "tokenizer": "builtin:bpe-tiny@v1",
        "vocab_size": 1024,
    }
    assert {k: space.image[k] for k in ("tokenizer", "codebook_size", "tokens_per_image", "resolution")} == {
        "tokenizer": "builtin:vq-tiny@v1",
        "codebook_size": 512,
        "tokens_per_image": 64,
        "resolution": [32, 32],
    }
    assert {
        k: space.audio[k]
        for k in ("codec", "sample_rate", "channels", "frame_rate", "n_codebooks", "codebook_size", "flatten_order")
    } == {
        "codec": "builtin:encodec-24khz-tiny@v1",
        "sample_rate": 24000,
        "channels": 1,
        "frame_rate": 75,
        "n_codebooks": 2,
        "codebook_size": 1024,
        "flatten_order": "frame_major",
    }
    assert space.extra["templates"]["t2i"] == {
        "prompt": ["<|sot|>", "text", "<|eot|>"],
        "target": ["<|soi|>", "image", "<|eoi|>", "<|eos_mm|>"],
    }
    assert space.vocab_size_total == 1024 + 8 + 512 + 2 * 1024


def test_runtime_sizes_equal_the_written_token_space(tokenizer: UnifiedTokenizer, tmp_path: Path) -> None:
    space = TokenSpace.read(tokenizer.token_space.write(tmp_path))
    assert tokenizer.runtime_sizes() == {
        "text_vocab_size": space.range(TEXT).size,
        "image_codebook_size": space.range(IMAGE).size,
        "image_tokens_per_image": space.tokens_per_image,
        "audio_n_codebooks": space.n_audio_codebooks,
        "audio_codebook_size": space.audio_codebook_size,
        "audio_frame_rate": space.audio["frame_rate"],
        "audio_sample_rate": space.audio["sample_rate"],
    }


def test_same_config_gives_the_same_token_space_bytes(tokenizer: UnifiedTokenizer, strict: UnifiedTokenizer) -> None:
    assert strict.token_space.to_json_bytes() == tokenizer.token_space.to_json_bytes()


# ----------------------------------------------------------------------------- text
def test_text_encodes_to_the_text_range_and_back(tokenizer: UnifiedTokenizer) -> None:
    encoded = tokenizer.encode_text(SENTENCE)
    assert encoded.ids.dtype == np.int64 and encoded.ids.ndim == 1
    assert np.array_equal(encoded.ids, encoded.codes + tokenizer.token_space.range(TEXT).start)
    assert encoded.meta == {
        "adapter": "builtin:bpe-tiny@v1",
        "sha256": hashlib.sha256(SENTENCE.encode()).hexdigest(),
        "tokens": encoded.ids.size,
    }
    assert tokenizer.decode_text(encoded.ids) == SENTENCE


def test_text_over_the_token_limit_is_refused(strict: UnifiedTokenizer) -> None:
    with pytest.raises(TextTooLongError, match=r"text_too_long: <text>: \d+ tokens exceeds the limit of 5"):
        strict.encode_text(SENTENCE)


# ---------------------------------------------------------------------------- images
def test_image_from_a_path_or_in_memory_gives_the_same_ids(tokenizer: UnifiedTokenizer, media: dict[str, Path]) -> None:
    from_path = tokenizer.encode_image(media["image"])
    in_memory = tokenizer.encode_image(picture())
    assert np.array_equal(from_path.ids, in_memory.ids)
    assert from_path.ids.shape == (64,)
    start, end = tokenizer.token_space.modality_range(IMAGE)
    assert from_path.ids.min() >= start and from_path.ids.max() < end
    assert from_path.meta == {
        "adapter": "builtin:vq-tiny@v1",
        "sha256": file_sha256(media["image"]),
        "source_size": [48, 40],
        "resolution": [32, 32],
        "tokens": 64,
    }
    assert in_memory.meta["sha256"] == hashlib.sha256(picture().tobytes()).hexdigest()
    json.dumps(from_path.meta)
    decoded = tokenizer.decode_image(from_path.ids)
    assert (decoded.size, decoded.mode) == ((32, 32), "RGB")


def test_images_in_batches_encode_as_one_at_a_time(tokenizer: UnifiedTokenizer, strict: UnifiedTokenizer) -> None:
    images = [picture(20 + 7 * i, 30 - 3 * i) for i in range(5)]
    batched = strict.encode_images(images)
    assert [e.ids.tolist() for e in batched] == [tokenizer.encode_image(image).ids.tolist() for image in images]


def test_decoding_ids_that_are_not_one_image_is_refused(tokenizer: UnifiedTokenizer) -> None:
    ids = tokenizer.encode_image(picture()).ids
    with pytest.raises(TokenSpaceError, match="an image is 64 ids, got 63"):
        tokenizer.decode_image(ids[:-1])
    with pytest.raises(TokenSpaceError, match="outside the image range"):
        tokenizer.decode_image(tokenizer.encode_text(SENTENCE).ids)


# ----------------------------------------------------------------------------- audio
def test_audio_from_a_path_or_an_array_gives_the_same_ids(tokenizer: UnifiedTokenizer, media: dict[str, Path]) -> None:
    from_path = tokenizer.encode_audio(media["audio"])
    from_array = tokenizer.encode_audio((chord(0.3), 16000))
    assert np.array_equal(from_path.ids, from_array.ids)
    # 0.3 s resampled to 24 kHz = 7200 samples -> ceil(0.3 * 75) = 23 frames of 2 codebooks.
    assert from_path.codes.shape == (2, 23) and from_path.ids.shape == (46,)
    assert np.array_equal(from_path.ids, tokenizer.token_space.audio_to_global(from_path.codes))
    assert from_path.meta == {
        "adapter": "builtin:encodec-24khz-tiny@v1",
        "sha256": file_sha256(media["audio"]),
        "source_sample_rate": 16000,
        "source_channels": 1,
        "duration_s": 0.3,
        "sample_rate": 24000,
        "channels": 1,
        "frames": 23,
        "padding_samples": 23 * 320 - 7200,
        "tokens": 46,
    }
    assert from_array.meta["sha256"] == hashlib.sha256(chord(0.3).astype("<f4").tobytes()).hexdigest()
    stereo = tokenizer.encode_audio((np.stack([chord(0.3), chord(0.3)]), 16000))
    assert np.array_equal(stereo.ids, from_array.ids)


def test_audio_in_batches_encodes_as_one_at_a_time(tokenizer: UnifiedTokenizer, strict: UnifiedTokenizer) -> None:
    clips = [
        (chord(seconds, rate), rate)
        for seconds, rate in [(0.05, 16000), (0.29, 22050), (0.12, 24000), (0.2, 8000), (0.01, 44100)]
    ]
    batched = strict.encode_audios(clips)
    assert [e.ids.tolist() for e in batched] == [tokenizer.encode_audio(clip).ids.tolist() for clip in clips]


def test_audio_decodes_to_the_codec_rate(tokenizer: UnifiedTokenizer) -> None:
    encoded = tokenizer.encode_audio((chord(0.2), 16000))
    waveform, rate = tokenizer.decode_audio(encoded.ids)
    assert rate == 24000
    assert waveform.shape == (1, encoded.meta["frames"] * 320) and waveform.dtype == np.float32
    with pytest.raises(TokenSpaceError, match="not a whole number of 2-codebook frames"):
        tokenizer.decode_audio(encoded.ids[:-1])


# ------------------------------------------------------------------------- bad input
def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_bad_file(kind: str, folder: Path) -> Path:
    if kind == "missing":
        return folder / "absent.png"
    if kind == "garbage_png":
        path = folder / "garbage.png"
        path.write_bytes(np.random.default_rng(0).bytes(2000))
    elif kind == "truncated_png":
        path = folder / "truncated.png"
        noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        data = png_bytes(noisy)
        path.write_bytes(data[: len(data) // 2])
    elif kind == "huge_header_png":
        # A valid 8x8 PNG whose IHDR (with its CRC fixed) claims 20000 x 20000 pixels.
        data = bytearray(png_bytes(Image.new("RGB", (8, 8), "red")))
        data[16:24] = struct.pack(">II", 20000, 20000)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
        path = folder / "huge.png"
        path.write_bytes(bytes(data))
    elif kind == "truncated_wav":
        path = folder / "truncated.wav"
        soundfile.write(str(path), chord(0.25), 16000, subtype="PCM_16")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "zero_length_wav":
        path = folder / "empty.wav"
        soundfile.write(str(path), np.zeros(0, np.float32), 16000, subtype="PCM_16")
    elif kind == "garbage_wav":
        path = folder / "garbage.wav"
        path.write_bytes(b"RIFF" + np.random.default_rng(1).bytes(500))
    return path


@pytest.mark.parametrize(
    ("kind", "modality", "error"),
    [
        ("missing", "image", MissingFileError),
        ("garbage_png", "image", UnreadableMediaError),
        ("truncated_png", "image", TruncatedMediaError),
        ("huge_header_png", "image", ImageTooLargeError),
        ("missing", "audio", MissingFileError),
        ("truncated_wav", "audio", TruncatedMediaError),
        ("zero_length_wav", "audio", EmptyAudioError),
        ("garbage_wav", "audio", UnreadableMediaError),
    ],
)
def test_each_bad_file_raises_its_error_naming_the_file(
    tokenizer: UnifiedTokenizer, tmp_path: Path, kind: str, modality: str, error: type
) -> None:
    path = write_bad_file(kind, tmp_path)
    encode = tokenizer.encode_image if modality == "image" else tokenizer.encode_audio
    with pytest.raises(error) as caught:
        encode(path)
    assert str(path) in str(caught.value)
    assert str(caught.value).startswith(error.reason)


def test_inputs_over_the_limits_are_refused(strict: UnifiedTokenizer, media: dict[str, Path], tmp_path: Path) -> None:
    long_wav = tmp_path / "long.wav"
    soundfile.write(str(long_wav), chord(0.5), 16000, subtype="PCM_16")
    with pytest.raises(AudioTooLongError, match=f"audio_too_long: {long_wav}: 0.50 s exceeds the limit of 0.3 s"):
        strict.encode_audio(long_wav)
    with pytest.raises(AudioTooLongError, match="<array>: 0.50 s"):
        strict.encode_audio((chord(0.5), 16000))
    with pytest.raises(
        ImageTooLargeError, match=f"image_too_large: {media['image']}: 48x40 = 1920 px exceeds the limit of 1000 px"
    ):
        strict.encode_image(media["image"])
    with pytest.raises(ImageTooLargeError, match="<PIL image>: 48x40"):
        strict.encode_image(picture())


@pytest.mark.parametrize(
    ("waveform", "rate", "error", "message"),
    [
        (np.zeros(0, np.float32), 16000, EmptyAudioError, "audio has no samples"),
        (np.zeros((2, 0), np.float32), 16000, EmptyAudioError, "audio has no samples"),
        (np.full(800, np.nan, np.float32), 16000, UnreadableMediaError, "NaN or infinite"),
        (np.zeros((1, 2, 800), np.float32), 16000, UnreadableMediaError, r"got shape \[1, 2, 800\]"),
        (np.zeros(800, np.float32), 0, UnreadableMediaError, "sample rate must be positive"),
    ],
)
def test_bad_arrays_are_refused(
    tokenizer: UnifiedTokenizer, waveform: np.ndarray, rate: int, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        tokenizer.encode_audio((waveform, rate))


def test_sources_of_the_wrong_type_are_type_errors(tokenizer: UnifiedTokenizer) -> None:
    with pytest.raises(TypeError, match="an image source is a path or a PIL image"):
        tokenizer.encode_image(np.zeros((3, 8, 8)))
    with pytest.raises(TypeError, match="an audio source is a path or a"):
        tokenizer.encode_audio(np.zeros(800))


# ------------------------------------------------------------------------- settings
DUMMY_TOKENIZERS = {
    "text": {"kind": "dummy", "vocab_size": 300},
    "image": {"kind": "dummy", "codebook_size": 16, "tokens_per_image": 4, "resolution": 8},
    "audio": {
        "kind": "dummy",
        "codebook_size": 8,
        "n_codebooks": 2,
        "sample_rate": 8000,
        "channels": 1,
        "frame_rate": 50,
    },
}


def test_map_path_uses_the_longest_matching_host_prefix() -> None:
    config = UTIConfig.model_validate(
        {"tokenizers": DUMMY_TOKENIZERS, "path_prefix_map": {"/host": "/mnt/all", "/host/data": "/data"}}
    )
    tokenizer = UnifiedTokenizer(config)
    assert tokenizer.map_path("/host/data/a.png") == "/data/a.png"
    assert tokenizer.map_path("/host/other/b.wav") == "/mnt/all/other/b.wav"
    assert tokenizer.map_path("/hostile/c.png") == "/hostile/c.png"


def test_config_from_a_yaml_path_and_torch_threads(tmp_path: Path) -> None:
    import torch
    import yaml

    path = tmp_path / "uti.yaml"
    path.write_text(yaml.safe_dump({"tokenizers": DUMMY_TOKENIZERS, "pipeline": {"torch_threads": 1}}))
    threads = torch.get_num_threads()
    try:
        dummy = UnifiedTokenizer.from_config_path(path)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert dummy.runtime_sizes()["text_vocab_size"] == 300
    assert dummy.token_space.vocab_size_total == 300 + 8 + 16 + 2 * 8
    assert dummy.encode_audio((chord(0.1, 8000), 8000)).codes.shape == (2, 5)


# ---------------------------------------------------------------------- determinism
ENCODE_SCRIPT = """
import hashlib, json, sys
from lumo_core.uti.unified import UnifiedTokenizer
tokenizer = UnifiedTokenizer.from_config_path(None)
encoded = {"text": tokenizer.encode_text(sys.argv[1]), "image": tokenizer.encode_image(sys.argv[2]), "audio": tokenizer.encode_audio(sys.argv[3])}
print(json.dumps({k: hashlib.sha256(v.ids.astype("<i8").tobytes()).hexdigest() for k, v in encoded.items()}))
"""


@pytest.mark.slow
def test_each_modality_encodes_identically_in_another_process(
    tokenizer: UnifiedTokenizer, media: dict[str, Path]
) -> None:
    args = [sys.executable, "-c", ENCODE_SCRIPT, SENTENCE, str(media["image"]), str(media["audio"])]
    other = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert other.returncode == 0, other.stderr
    here = {
        "text": tokenizer.encode_text(SENTENCE).ids,
        "image": tokenizer.encode_image(media["image"]).ids,
        "audio": tokenizer.encode_audio(media["audio"]).ids,
    }
    assert set(here) == {TEXT, IMAGE, AUDIO}
    expected = {k: hashlib.sha256(v.astype("<i8").tobytes()).hexdigest() for k, v in here.items()}
    assert json.loads(other.stdout.strip().splitlines()[-1]) == expected
