"""Image: a diffusers `VQModel` (aMUSEd / latent-diffusion VQ-GAN layout)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from lumo_core.errors import ConfigError
from lumo_core.uti.adapters.base import (
    ImageAdapter,
    _from_pretrained,
    _to_pil_images,
    deterministic_device,
    fit_to_unit_range,
    pad_rows,
)
from lumo_core.uti.weights import weights_identity


class VQImageAdapter(ImageAdapter):
    """A diffusers `VQModel` (aMUSEd / latent-diffusion VQ-GAN layout). Codes are the
    quantizer's nearest-code indices over the latent grid in row-major order."""

    def __init__(
        self,
        path: str,
        name: str,
        device: str,
        resolution: int | None = None,
        batch_size: int = 16,
        revision: str | None = None,
    ) -> None:
        from diffusers import VQModel

        self.name = name
        self.device = device
        self.batch_size = self.rows_per_call = batch_size
        deterministic_device(device)
        self.model = _from_pretrained(VQModel, path, "VQ image tokenizer", revision).to(device).eval()
        self.weights = weights_identity(path, revision)
        config = self.model.config
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        # aMUSEd's VQ config leaves sample_size at a default that is not its training size:
        # `tokenizers.image.resolution` overrides it.
        side = int(resolution or config.sample_size)
        if side % self.downsample:
            raise ConfigError(
                f"tokenizers.image.resolution: {side} px is not a multiple of the downsampling factor {self.downsample} of {name}"
            )
        self.resolution = (side, side)
        self.latent_grid = (side // self.downsample, side // self.downsample)
        self.tokens_per_image = self.latent_grid[0] * self.latent_grid[1]
        self.codebook_size = int(config.num_vq_embeddings)
        self.embed_dim = int(self.model.quantize.vq_embed_dim)

    def preprocessor(self) -> Callable[[Any], np.ndarray]:
        return partial(fit_to_unit_range, size=self.resolution)

    def encode_batch(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        pixels = np.asarray(pixels, dtype=np.float32)
        expected = (3, *self.resolution)
        if pixels.ndim != 4 or pixels.shape[1:] != expected:
            raise ValueError(
                f"pixels must be shaped [batch, {', '.join(map(str, expected))}] (run the preprocessor), got {list(pixels.shape)}"
            )
        codes = []
        for start in range(0, pixels.shape[0], self.batch_size):
            chunk = pixels[start : start + self.batch_size]
            with torch.inference_mode():
                latents = self.model.encode(
                    torch.from_numpy(np.ascontiguousarray(pad_rows(chunk, self.batch_size))).to(self.device)
                ).latents
                _, _, (_, _, indices) = self.model.quantize(latents)
            codes.append(indices.reshape(self.batch_size, -1)[: chunk.shape[0]].to("cpu").numpy().astype(np.int64))
        return np.concatenate(codes)

    def decode_batch(self, codes: np.ndarray) -> list[Any]:
        import torch

        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[1] != self.tokens_per_image:
            raise ValueError(f"codes must be shaped [batch, {self.tokens_per_image}], got {list(codes.shape)}")
        shape = (codes.shape[0], *self.latent_grid, self.embed_dim)
        indices = torch.from_numpy(codes.reshape(-1)).to(self.device)
        with torch.inference_mode():
            if self.model.config.lookup_from_codebook:
                pixels = self.model.decode(indices, force_not_quantize=True, shape=shape).sample
            else:
                latents = self.model.quantize.get_codebook_entry(indices, shape)
                pixels = self.model.decode(latents, force_not_quantize=True).sample
        return _to_pil_images(pixels)

    def describe(self) -> dict[str, Any]:
        return {
            "tokenizer": self.name,
            "kind": "vq",
            "codebook_size": self.codebook_size,
            "tokens_per_image": self.tokens_per_image,
            "resolution": list(self.resolution),
            "latent_grid": list(self.latent_grid),
            "order": "row_major",
            "input": "centre crop to the aspect ratio, bicubic resize, scaled to [-1, 1]",
            "weights": self.weights,
        }
