"""Tokenizer adapters: one small interface per modality, and the implementations.

- `base`: the interfaces (TextAdapter, ImageAdapter, AudioAdapter) and shared preprocessing.
- `text`: any Hugging Face tokenizer (`AutoTokenizer.from_pretrained`).
- `vq`: images through a diffusers `VQModel` (aMUSEd / latent-diffusion VQ-GAN layout).
- `seed`: images through SEED as AnyGPT uses it.
- `encodec`: audio through EnCodec (`transformers.EncodecModel`).
- `testing`: dummy adapters: deterministic, model-free, for fast tests (config kind "dummy").
- `factory`: `build_adapters`, from the `tokenizers` section of a UTI config.

Heavy libraries (torch, transformers, diffusers) load only when a real adapter is built.
"""

from lumo_core.uti.adapters.base import AudioAdapter, ImageAdapter, TextAdapter, pad_rows
from lumo_core.uti.adapters.factory import (
    build_adapters,
    build_audio_adapter,
    build_image_adapter,
    build_text_adapter,
    check_device,
)
from lumo_core.uti.adapters.testing import (
    DummyAudioAdapter,
    DummyImageAdapter,
    DummyTextAdapter,
)

__all__ = [
    "AudioAdapter",
    "DummyAudioAdapter",
    "DummyImageAdapter",
    "DummyTextAdapter",
    "ImageAdapter",
    "TextAdapter",
    "build_adapters",
    "build_audio_adapter",
    "build_image_adapter",
    "build_text_adapter",
    "check_device",
    "pad_rows",
]
