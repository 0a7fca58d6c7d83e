"""Audio: EnCodec through `transformers.EncodecModel`, and its bandwidth rule."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from lumo_core.errors import ConfigError
from lumo_core.uti.adapters.base import (
    AudioAdapter,
    _from_pretrained,
    deterministic_device,
    to_codec_format,
)
from lumo_core.uti.weights import weights_identity


def encodec_bandwidth_table(target_bandwidths: list[float], frame_rate: float, codebook_size: int) -> dict[float, int]:
    """kbps -> number of codebooks, by the rule transformers' EncodecModel applies
    (floor(kbps * 1000 / (frame_rate * log2(codebook_size)))), e.g. 24 kHz: 1.5 -> 2 ... 24 -> 32."""
    bits = math.log2(codebook_size)
    return {float(bw): max(1, math.floor(float(bw) * 1000 / (frame_rate * bits))) for bw in target_bandwidths}


def choose_encodec_bandwidth(
    table: dict[float, int], bandwidth: float | None, n_codebooks: int | None, source: str
) -> tuple[float, int]:
    """Resolve the configured bandwidth and/or codebook count against the codec's table."""
    offered = ", ".join(f"{bw:g} kbps -> {n} codebooks" for bw, n in table.items())
    if bandwidth is None and n_codebooks is None:
        raise ConfigError(f"tokenizers.audio: set `bandwidth` or `n_codebooks` for {source} ({offered})")
    if bandwidth is not None:
        if float(bandwidth) not in table:
            raise ConfigError(
                f"tokenizers.audio.bandwidth: {bandwidth:g} kbps is not offered by {source}; it offers {offered}"
            )
        expected = table[float(bandwidth)]
        if n_codebooks is not None and n_codebooks != expected:
            raise ConfigError(
                f"tokenizers.audio.n_codebooks: {n_codebooks} does not match bandwidth {bandwidth:g} kbps of {source}, which gives {expected} ({offered})"
            )
        return float(bandwidth), expected
    matching = [bw for bw, n in table.items() if n == n_codebooks]
    if not matching:
        raise ConfigError(
            f"tokenizers.audio.n_codebooks: {n_codebooks} is not offered by {source}; it offers {offered}"
        )
    return matching[0], int(n_codebooks)


class EncodecAdapter(AudioAdapter):
    """EnCodec through transformers' `EncodecModel`.

    Frames: unchunked codecs (24 kHz) emit ceil(samples / hop) frames; chunked codecs (48 kHz)
    encode 1 s chunks every `chunk_stride` samples, each giving ceil(chunk samples / hop) frames,
    concatenated in time (so 1 s at 48 kHz is 150 + 2 frames: the codec's own padding rule).

    Batching never changes the codes: a batch only ever holds inputs of one padded length, and an
    input's padded length depends on its own length alone (float results of the convolutions
    change in the last bits with the sequence length, enough to flip a nearest code now and
    then). Causal unchunked codecs without normalisation never see the zero padding from any
    frame that is kept, so they zero-pad every input to a multiple of `BUCKET_FRAMES` frames and
    batch each such bucket; non-causal or normalising codecs look at padding (and scale by its
    loudness), so they batch only equal lengths and pad nothing.

    Decoding from tokens alone uses unit chunk scales (a normalising codec then returns
    loudness-normalised audio); `decode_batch(..., scales=)` takes the scales the encoder
    reported in its meta.
    """

    # 1/3 s at 75 frames/s: the most padding one input pays. At least 8 frames also keeps the
    # convolutions off their short-input reflect padding, which would see the batch's padding.
    BUCKET_FRAMES = 25

    def __init__(
        self,
        path: str,
        name: str,
        bandwidth: float | None,
        n_codebooks: int | None,
        device: str,
        batch_size: int = 8,
        revision: str | None = None,
    ) -> None:
        from transformers import EncodecModel

        self.name = name
        self.device = device
        self.batch_size = batch_size
        deterministic_device(device)
        self.model = _from_pretrained(EncodecModel, path, "audio codec", revision).to(device).eval()
        self.weights = weights_identity(path, revision)
        config = self.model.config
        self.sample_rate = int(config.sampling_rate)
        self.channels = int(config.audio_channels)
        self.hop_length = int(config.hop_length)
        self.frame_rate = int(config.frame_rate)
        self.codebook_size = int(config.codebook_size)
        self.chunk_length = config.chunk_length
        self.chunk_stride = (config.chunk_stride or config.chunk_length) if config.chunk_length else None
        self.normalize = bool(config.normalize)
        self.causal = bool(config.use_causal_conv)
        self.bandwidth_table = encodec_bandwidth_table(
            list(config.target_bandwidths), self.frame_rate, self.codebook_size
        )
        self.bandwidth, self.n_codebooks = choose_encodec_bandwidth(self.bandwidth_table, bandwidth, n_codebooks, name)
        self._padding_is_invisible = self.causal and not self.normalize and self.chunk_length is None
        # Every model call sees `_batch_rows` inputs of one padded length (see `pad_rows`). Codecs
        # that see their padding can only batch equal lengths, which real data rarely has, so
        # they encode one input per call rather than pay for empty rows.
        self._batch_rows = self.rows_per_call = batch_size if self._padding_is_invisible else 1

    def preprocessor(self) -> Callable[[np.ndarray, int], np.ndarray]:
        return partial(to_codec_format, channels=self.channels, target_rate=self.sample_rate)

    # ------------------------------------------------------------------ frame arithmetic
    def _chunk_lengths(self, n_samples: int) -> list[int]:
        return [min(self.chunk_length, n_samples - offset) for offset in range(0, n_samples, self.chunk_stride)]

    def n_frames(self, n_samples: int) -> int:
        if self.chunk_length is None:
            return -(-n_samples // self.hop_length)
        return sum(-(-length // self.hop_length) for length in self._chunk_lengths(n_samples))

    def _chunk_frames(self) -> int:
        return -(-self.chunk_length // self.hop_length)

    def covered_samples(self, frames: int) -> int:
        if self.chunk_length is None:
            return frames * self.hop_length
        chunks = -(-frames // self._chunk_frames())
        last = frames - (chunks - 1) * self._chunk_frames()
        return (chunks - 1) * self.chunk_stride + last * self.hop_length

    # ------------------------------------------------------------------------- encoding
    def _padded_length(self, n_samples: int) -> int:
        if not self._padding_is_invisible:
            return n_samples
        bucket = self.BUCKET_FRAMES * self.hop_length
        return -(-n_samples // bucket) * bucket

    def batch_key(self, n_samples: int) -> int:
        return self._padded_length(n_samples)

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices grouped by padded length (in order of that length), at most `_batch_rows` a group."""
        groups: dict[int, list[int]] = {}
        for index, length in enumerate(lengths):
            groups.setdefault(self._padded_length(length), []).append(index)
        rows = self._batch_rows
        return [
            groups[width][start : start + rows]
            for width in sorted(groups)
            for start in range(0, len(groups[width]), rows)
        ]

    def encode_batch(self, waveforms: list[np.ndarray]) -> list[np.ndarray]:
        return [codes for codes, _ in self.encode_batch_with_meta(waveforms)]

    def encode_batch_with_meta(self, waveforms: list[np.ndarray]) -> list[tuple[np.ndarray, dict[str, Any]]]:
        import torch

        waves = [np.asarray(w, dtype=np.float32) for w in waveforms]
        for index, wave in enumerate(waves):
            if wave.ndim != 2 or wave.shape[0] != self.channels or wave.shape[1] == 0:
                raise ValueError(
                    f"waveform {index} must be shaped [{self.channels}, samples > 0] at {self.sample_rate} Hz (run the preprocessor), got {list(wave.shape)}"
                )
        results: dict[int, tuple[np.ndarray, dict[str, Any]]] = {}
        for members in self._batches([w.shape[1] for w in waves]):
            width = self._padded_length(waves[members[0]].shape[1])
            batch = np.zeros((self._batch_rows, self.channels, width), dtype=np.float32)
            mask = np.zeros((self._batch_rows, self.channels, width), dtype=bool)
            for row, index in enumerate(members):
                batch[row, :, : waves[index].shape[1]] = waves[index]
                mask[row, :, : waves[index].shape[1]] = True
            with torch.inference_mode():
                out = self.model.encode(
                    torch.from_numpy(batch).to(self.device),
                    padding_mask=torch.from_numpy(mask).to(self.device),
                    bandwidth=self.bandwidth,
                )
            # (chunks, batch, n_q, frames): chunks follow each other in time.
            codes = torch.cat(list(out.audio_codes), dim=-1).to("cpu").numpy().astype(np.int64)
            scales = (
                None if out.audio_scales[0] is None else torch.cat(list(out.audio_scales), dim=-1).to("cpu").numpy()
            )
            for row, index in enumerate(members):
                n_samples = waves[index].shape[1]
                frames = self.n_frames(n_samples)
                meta: dict[str, Any] = {"frames": frames, "padding_samples": self.padding_samples(n_samples)}
                if scales is not None:
                    meta["chunk_scales"] = [float(s) for s in scales[row]]
                if out.audio_codes.shape[0] > 1:
                    meta["last_chunk_pad_frames"] = int(out.last_frame_pad_length or 0)
                results[index] = (np.ascontiguousarray(codes[row, :, :frames]), meta)
        return [results[index] for index in range(len(waves))]

    # ------------------------------------------------------------------------- decoding
    def decode_batch(
        self,
        codes: list[np.ndarray],
        n_samples: list[int | None] | None = None,
        scales: list[list[float] | None] | None = None,
    ) -> list[np.ndarray]:
        """Codes -> waveforms; trimmed to `n_samples[i]` when given (the source length), else
        to what the frames cover. `scales[i]`: the encoder's chunk scales (default: unit)."""
        import torch

        waves = []
        for index, item in enumerate(codes):
            item = np.asarray(item, dtype=np.int64)
            if item.ndim != 2 or item.shape[0] != self.n_codebooks or item.shape[1] == 0:
                raise ValueError(
                    f"codes {index} must be shaped [{self.n_codebooks}, frames > 0], got {list(item.shape)}"
                )
            frames = item.shape[1]
            per_chunk = frames if self.chunk_length is None else self._chunk_frames()
            chunks = -(-frames // per_chunk)
            pad = chunks * per_chunk - frames
            stacked = np.pad(item, ((0, 0), (0, pad))).reshape(self.n_codebooks, chunks, per_chunk).transpose(1, 0, 2)
            audio_codes = torch.from_numpy(np.ascontiguousarray(stacked[:, None])).to(self.device)
            item_scales = scales[index] if scales is not None else None
            if item_scales is None:
                audio_scales = [None] * chunks
            else:
                audio_scales = [torch.tensor([[s]], dtype=torch.float32, device=self.device) for s in item_scales]
            with torch.inference_mode():
                out = self.model.decode(audio_codes, audio_scales, last_frame_pad_length=pad)
            wave = out.audio_values[0].to("cpu").float().numpy()
            source_length = n_samples[index] if n_samples is not None else None
            length = self.covered_samples(frames) if source_length is None else source_length
            waves.append(np.ascontiguousarray(wave[:, :length]))
        return waves

    def describe(self) -> dict[str, Any]:
        return {
            "codec": self.name,
            "kind": "encodec",
            "sample_rate": self.sample_rate,
            "channels": self.channels,
            "frame_rate": self.frame_rate,
            "hop_length": self.hop_length,
            "n_codebooks": self.n_codebooks,
            "codebook_size": self.codebook_size,
            "bandwidth_kbps": self.bandwidth,
            "tokens_per_second": self.frame_rate * self.n_codebooks,
            "chunk_length_samples": self.chunk_length,
            "chunk_stride_samples": self.chunk_stride,
            "frames_rule": (
                f"ceil(samples / {self.hop_length})"
                if self.chunk_length is None
                else f"sum over chunks of {self.chunk_length} samples every {self.chunk_stride}: ceil(chunk samples / {self.hop_length})"
            ),
            "input": "channels: mono duplicated / others averaged; rate: polyphase resampling (scipy resample_poly)",
            "encoder_padding": (
                f"zeros to a multiple of {self.BUCKET_FRAMES * self.hop_length} samples"
                if self._padding_is_invisible
                else "none"
            ),
            "weights": self.weights,
        }
