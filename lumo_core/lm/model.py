"""The token LM: build or load a Hugging Face causal LM for a token space, and make it trainable.

- `build_model`: a local Hugging Face causal LM folder, or the small default model built here
  (Llama- or Qwen2-style, random init from `model.init_seed`). Embeddings and head are sized to
  `vocab_size_total`; rows past the text range that a loaded text model never had start at the
  mean of its text rows plus a little noise (seeded). The model's config records the token
  space it is trained for (`lumo_token_space_sha256`), so shards and checkpoints can be checked
  against it.
- `apply_lora`: LoRA adapters through peft, with the embedding and head rows of the non-text
  tokens trainable (`trainable_token_indices`); everything else stays frozen. With modality
  heads (lumo_core.lm.heads) those rows are the image and audio heads, so they train under
  LoRA too, and the text head's text rows stay frozen as with the shared head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lumo_core.errors import LumoError, TokenSpaceError
from lumo_core.lm.heads import HEADS_ATTR, heads_for, heads_to_config
from lumo_core.lm.train_config import TrainConfig
from lumo_core.uti.token_space import TEXT, TokenSpace

TOKEN_SPACE_ATTR = "lumo_token_space_sha256"
PAD_TOKEN = "<|pad_mm|>"
EOS_TOKEN = "<|eos_mm|>"


def new_token_ids(token_space: TokenSpace) -> list[int]:
    """Ids a text LM has never seen: every special, image and audio id."""
    return list(range(token_space.range(TEXT).end, token_space.vocab_size_total))


def _default_model(config: TrainConfig, token_space: TokenSpace) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    spec = config.model.default
    common = dict(
        vocab_size=token_space.vocab_size_total,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        tie_word_embeddings=spec.tie_word_embeddings,
        pad_token_id=token_space.special_id(PAD_TOKEN),
        eos_token_id=token_space.special_id(EOS_TOKEN),
        bos_token_id=None,
    )
    model_config = LlamaConfig(**common) if spec.architecture == "llama" else Qwen2Config(**common)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.model.init_seed)
        return AutoModelForCausalLM.from_config(
            model_config, attn_implementation=config.model.attn_implementation, dtype=torch.float32
        )


def _init_rows(weight: Any, start: int, noise: float, generator: Any) -> None:
    """Rows [start, end) := mean of rows [0, start) + noise x their per-dimension spread."""
    import torch

    with torch.no_grad():
        reference = weight[:start].float()
        mean, spread = reference.mean(dim=0), reference.std(dim=0)
        rows = weight.shape[0] - start
        fresh = mean + noise * spread * torch.randn((rows, weight.shape[1]), generator=generator)
        weight[start:] = fresh.to(weight.dtype)


def _loaded_model(config: TrainConfig, token_space: TokenSpace) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(config.model.path)
    if not (path / "config.json").is_file():
        raise LumoError(f"model.path {path}: not a Hugging Face model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=config.model.attn_implementation, use_safetensors=True
    )
    recorded = getattr(model.config, TOKEN_SPACE_ATTR, None)
    rows = model.get_input_embeddings().weight.shape[0]
    if recorded is not None:
        if recorded != token_space.sha256:
            raise TokenSpaceError(
                f"model.path {path} was trained for token space {recorded[:12]}, not {token_space.sha256[:12]}"
            )
        if rows != token_space.vocab_size_total:
            raise TokenSpaceError(
                f"model.path {path} has {rows} embedding rows, its token space has {token_space.vocab_size_total}"
            )
        return model
    text_size = token_space.range(TEXT).size
    if rows < text_size:
        raise TokenSpaceError(
            f"model.path {path} has {rows} embedding rows, fewer than the {text_size} ids of the text tokenizer: it is not a model for this tokenizer"
        )
    model.resize_token_embeddings(token_space.vocab_size_total, mean_resizing=False)
    generator = torch.Generator().manual_seed(config.model.init_seed)
    embeddings = model.get_input_embeddings().weight
    _init_rows(embeddings.data, text_size, config.model.new_row_noise, generator)
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != embeddings.data_ptr():
        _init_rows(head.weight.data, text_size, config.model.new_row_noise, generator)
    model.config.pad_token_id = token_space.special_id(PAD_TOKEN)
    model.config.eos_token_id = token_space.special_id(EOS_TOKEN)
    return model


def build_model(config: TrainConfig, token_space: TokenSpace, init: Any = None) -> Any:
    """The base model for `token_space` (fp32, on CPU), stamped with the token space's sha256
    and, with `model.modality_heads`, with its heads. `init` (a model already loaded, such as a
    checkpoint's weights for `lumo train --init-from`) replaces `model.path` and the default."""
    if init is not None:
        model = init
    else:
        model = _loaded_model(config, token_space) if config.model.path else _default_model(config, token_space)
    setattr(model.config, TOKEN_SPACE_ATTR, token_space.sha256)
    if config.model.modality_heads:
        setattr(model.config, HEADS_ATTR, heads_to_config(heads_for(token_space)))
    elif hasattr(model.config, HEADS_ATTR):
        delattr(model.config, HEADS_ATTR)
    model.generation_config.pad_token_id = token_space.special_id(PAD_TOKEN)
    model.generation_config.eos_token_id = token_space.special_id(EOS_TOKEN)
    model.generation_config.bos_token_id = None
    return model


def _module_name(model: Any, module: Any) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise LumoError(f"module {type(module).__name__} not found in the model")


def lora_config(model: Any, config: TrainConfig, token_space: TokenSpace) -> Any:
    from peft import LoraConfig

    rows = new_token_ids(token_space)
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embeddings.weight.data_ptr()
    # peft ties the head to the embedding adapter by itself; an untied head needs its own rows.
    indices: list[int] | dict[str, list[int]] = (
        rows if tied or head is None else {_module_name(model, embeddings): rows, _module_name(model, head): rows}
    )
    lora = config.finetune.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        trainable_token_indices=indices,
        task_type="CAUSAL_LM",
    )


def apply_lora(model: Any, config: TrainConfig, token_space: TokenSpace) -> Any:
    """Wrap `model` with LoRA adapters; only adapters and the non-text token rows train.

    peft draws `lora_A` from torch's global generator: it is seeded here from `seed`, the same
    on every rank, so two fresh runs start from the same adapters."""
    import torch
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return get_peft_model(model, lora_config(model, config, token_space))


def is_peft(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def trainable_parameters(model: Any) -> list[tuple[str, Any]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def parameter_counts(model: Any) -> dict[str, int]:
    return {
        "trainable": sum(p.numel() for _, p in trainable_parameters(model)),
        "total": sum(p.numel() for p in model.parameters()),
    }


def full_model(model: Any) -> Any:
    """A plain transformers model: LoRA adapters and token rows merged in (in place)."""
    return model.merge_and_unload() if is_peft(model) else model


def load_lm(path: str | Path, device: Any = "cpu") -> Any:
    """A saved LM folder (final/ or a full fine-tuning checkpoint), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise LumoError(f"{path}: not a saved model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    return model.to(device).eval()


def check_vocab(model: Any, token_space: TokenSpace) -> dict[str, Any]:
    """Whether the model's vocabulary is exactly the token space's (sizes and recorded sha256)."""
    embedding_rows = int(model.get_input_embeddings().weight.shape[0])
    head = model.get_output_embeddings()
    head_rows = int(head.weight.shape[0]) if head is not None else None
    recorded = getattr(model.config, TOKEN_SPACE_ATTR, None)
    passed = (
        int(model.config.get_text_config().vocab_size) == token_space.vocab_size_total
        and embedding_rows == token_space.vocab_size_total
        and head_rows in (None, token_space.vocab_size_total)
        and recorded == token_space.sha256
    )
    return {
        "passed": passed,
        "config_vocab_size": int(model.config.get_text_config().vocab_size),
        "embedding_rows": embedding_rows,
        "head_rows": head_rows,
        "vocab_size_total": token_space.vocab_size_total,
        "model_token_space_sha256": recorded,
        "token_space_sha256": token_space.sha256,
    }
