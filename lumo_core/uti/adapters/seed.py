"""Image: SEED as AnyGPT uses it (model code from a checkout, unCLIP for decoding)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from lumo_core.errors import AdapterLoadError
from lumo_core.uti.adapters.base import (
    ImageAdapter,
    _from_pretrained,
    deterministic_device,
    pad_rows,
    squash_clip_normalise,
)
from lumo_core.uti.weights import weights_identity

SEED_CHECKPOINT = "seed_quantizer.pt"
SEED_MODULE = "seed2.seed_qformer.qformer_quantizer"
SEED_MODULE_FILE = Path("seed2", "seed_qformer", "qformer_quantizer.py")


def locate_seed_files(
    checkpoint: str, model_code_path: str | None, unclip_path: str | None
) -> tuple[Path, Path, Path | None]:
    """(checkpoint file, folder to put on sys.path, unCLIP folder or None), or an
    AdapterLoadError naming everything that is missing and every path looked at."""
    problems = []
    checkpoint_candidates = [Path(checkpoint).expanduser(), Path(checkpoint).expanduser() / SEED_CHECKPOINT]
    checkpoint_file = next((p for p in checkpoint_candidates if p.is_file()), None)
    if checkpoint_file is None:
        problems.append(
            f"SEED checkpoint ({SEED_CHECKPOINT}) not found; looked at: {', '.join(map(str, checkpoint_candidates))}"
        )
    code_root = None
    if model_code_path is None:
        problems.append(
            "tokenizers.image.model_code_path is not set: it must point at a checkout of the SEED code (e.g. OpenMOSS/AnyGPT, which holds seed2/)"
        )
    else:
        base = Path(model_code_path).expanduser()
        # The AnyGPT checkout itself, or its seed2 folder.
        roots = [base, base.parent]
        code_candidates = [root / SEED_MODULE_FILE for root in roots]
        code_root = next((root for root, p in zip(roots, code_candidates) if p.is_file()), None)
        if code_root is None:
            problems.append(
                f"SEED model code ({SEED_MODULE_FILE}) not found; looked at: {', '.join(map(str, code_candidates))}"
            )
    unclip = None
    if unclip_path is not None:
        unclip = Path(unclip_path).expanduser()
        if not (unclip / "model_index.json").is_file():
            problems.append(f"unCLIP decoder not found: no {unclip / 'model_index.json'}")
    if problems:
        raise AdapterLoadError("cannot load the SEED image tokenizer: " + "; ".join(problems))
    return checkpoint_file, code_root, unclip  # type: ignore[return-value]


class SeedImageAdapter(ImageAdapter):
    """SEED as AnyGPT uses it: EVA-CLIP ViT-g -> Q-Former (32 queries) -> 32 codes of 8192.

    Its model code is not on the package index: `model_code_path` points at a checkout holding
    `seed2/` (OpenMOSS/AnyGPT). That code itself fetches `bert-base-uncased` and the EVA-CLIP
    weights when it builds the model: have them in the local caches on machines without a hub.
    Decoding goes through diffusers' StableUnCLIPImg2ImgPipeline from `unclip_path`.
    """

    codebook_size = 8192
    tokens_per_image = 32
    resolution = (224, 224)
    # Fixed sampling for decoding (AnyGPT's defaults), so a decode is reproducible.
    DECODE_STEPS = 20
    DECODE_GUIDANCE = 10.0
    DECODE_SEED = 0

    def __init__(
        self,
        checkpoint: str,
        name: str,
        device: str,
        model_code_path: str | None,
        unclip_path: str | None,
        resample: str,
        batch_size: int = 1,
    ) -> None:
        import torch

        checkpoint_file, code_root, self.unclip_path = locate_seed_files(checkpoint, model_code_path, unclip_path)
        self.name = name
        self.device = device
        self.batch_size = self.rows_per_call = batch_size
        deterministic_device(device)
        self.resample = resample
        self.dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.weights = weights_identity(checkpoint_file)
        # At the end of sys.path: a checkout's folder must not shadow an installed package (a
        # `torch/` or `transformers/` in it would otherwise be imported in their place).
        if str(code_root) not in sys.path:
            sys.path.append(str(code_root))
        try:
            module = importlib.import_module(SEED_MODULE)
        except ImportError as exc:
            raise AdapterLoadError(
                f"cannot import {SEED_MODULE} from {code_root}: {exc} (the SEED code needs its own requirements, e.g. einops and timm)"
            ) from exc
        try:
            model = module.Blip2QformerQuantizer.from_pretrained(
                pretrained_model_path=str(checkpoint_file),
                vit_precision="fp16" if self.dtype == torch.float16 else "fp32",
            )
        except (OSError, RuntimeError, ValueError) as exc:
            raise AdapterLoadError(f"cannot load the SEED image tokenizer from {checkpoint_file}: {exc}") from exc
        self.model = model.to(device=device, dtype=self.dtype).eval()
        self._pipeline: Any = None

    def preprocessor(self) -> Callable[[Any], np.ndarray]:
        return partial(squash_clip_normalise, size=self.resolution, resample=self.resample)

    def encode_batch(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        pixels = np.asarray(pixels, dtype=np.float32)
        if pixels.ndim != 4 or pixels.shape[1:] != (3, *self.resolution):
            raise ValueError(
                f"pixels must be shaped [batch, 3, 224, 224] (run the preprocessor), got {list(pixels.shape)}"
            )
        codes = []
        for start in range(0, pixels.shape[0], self.batch_size):
            chunk = pixels[start : start + self.batch_size]
            batch = torch.from_numpy(np.ascontiguousarray(pad_rows(chunk, self.batch_size))).to(
                device=self.device, dtype=self.dtype
            )
            with torch.inference_mode():
                indices, _ = self.model.get_codebook_indices(batch)
            codes.append(indices.reshape(self.batch_size, -1)[: chunk.shape[0]].to("cpu").numpy().astype(np.int64))
        return np.concatenate(codes)

    def decode_batch(self, codes: np.ndarray) -> list[Any]:
        import torch

        if self.unclip_path is None:
            raise AdapterLoadError(
                "decoding SEED codes needs the unCLIP decoder: set tokenizers.image.unclip_path (stable-diffusion-2-1-unclip)"
            )
        if self._pipeline is None:
            from diffusers import StableUnCLIPImg2ImgPipeline

            self._pipeline = _from_pretrained(
                StableUnCLIPImg2ImgPipeline, str(self.unclip_path), "unCLIP decoder", torch_dtype=self.dtype
            ).to(self.device)
        images = []
        with torch.inference_mode():
            for row in np.asarray(codes, dtype=np.int64):
                embeds = self.model.get_codebook_entry(torch.from_numpy(row[None]).to(self.device))
                generator = torch.Generator(device=self.device).manual_seed(self.DECODE_SEED)
                result = self._pipeline(
                    image_embeds=embeds,
                    noise_level=0,
                    num_inference_steps=self.DECODE_STEPS,
                    guidance_scale=self.DECODE_GUIDANCE,
                    generator=generator,
                )
                images.append(result.images[0].convert("RGB"))
        return images

    def describe(self) -> dict[str, Any]:
        return {
            "tokenizer": self.name,
            "kind": "seed",
            "codebook_size": self.codebook_size,
            "tokens_per_image": self.tokens_per_image,
            "resolution": list(self.resolution),
            "order": "q_former_query",
            "input": f"resize to 224x224 without keeping the aspect ratio, {self.resample}, CLIP mean/std",
            "weights": self.weights,
        }
