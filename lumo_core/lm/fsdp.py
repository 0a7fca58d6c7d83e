"""Sharded training with PyTorch FSDP2 (`train.parallelism: fsdp`), and the full states a
checkpoint holds whatever the parallelism.

`shard` applies `torch.distributed.fsdp.fully_shard` to every decoder layer (the classes a
Hugging Face model lists in `_no_split_modules`) and then to the whole model, so each rank holds
1/world of the parameters, gradients and optimizer state. On CUDA with bf16 the parameters are
cast to bf16 for compute and the gradients reduced in fp32 (MixedPrecisionPolicy); elsewhere
everything stays fp32. LoRA (peft) models are sharded the same way: the frozen base and the
adapters sit in the same groups, and only the trainable ones reach the optimizer.

Checkpoints gather full states (torch.distributed.checkpoint.state_dict with full_state_dict):
the model as a Hugging Face folder and the optimizer state by parameter name, both written by
rank 0 as safetensors plus JSON. That costs rank 0 host memory for one full copy at each save,
and buys three things: nothing read back is pickled (torch.distributed.checkpoint's own reader
unpickles its `.metadata`), `from_pretrained` loads every checkpoint, and the optimizer state
loads on any number of ranks, sharded or not.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_FULL = {"full_state_dict": True, "cpu_offload": True}


def _hf_model(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def shard(model: Any, bf16: bool) -> Any:
    """Shard `model` in place over the default process group (FSDP2) and return it."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    )
    blocks = set(getattr(_hf_model(model), "_no_split_modules", None) or [])
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextmanager
def no_gradient_sync(model: Any) -> Iterator[None]:
    """Accumulate gradients locally (the FSDP2 counterpart of DDP's `no_sync`)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_model_state(model: Any) -> dict[str, Any] | None:
    """A sharded model's full weights on rank 0's CPU (empty on the others); None when `model`
    is not sharded (it saves itself). Every rank calls this."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(**_FULL))
    # A tied weight (the LM head sharing the embedding) is stored once, as save_pretrained
    # stores it for an unsharded model.
    for name in tied_aliases(model):
        state.pop(name, None)
    return state


def tied_aliases(model: Any) -> set[str]:
    """Parameter names that are a second name of a tensor listed under another name."""
    return {name for name, _ in model.named_parameters(remove_duplicate=False)} - {
        name for name, _ in model.named_parameters()
    }


def full_optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """The optimizer state by parameter name, full, on rank 0's CPU. Every rank calls this."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(**_FULL))


def load_optimizer_state(model: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """Put a full optimizer state (by parameter name) into `optimizer`, each rank keeping its
    own shard when the model is sharded. Every rank calls this with the whole state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # Unsharded, the full state is this rank's own (the distributing path also needs a tensor
    # in the optimizer's state to learn the device, which a fresh SGD does not have).
    options = StateDictOptions(full_state_dict=is_sharded(model))
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=options)


def trainable_digest(model: Any) -> str:
    """sha256 over the trainable tensors in name order, gathering the shards first when sharded
    (equal on every rank when the ranks are in sync). Every rank calls this."""
    import hashlib

    from torch.distributed.tensor import DTensor

    from lumo_core.lm.model import trainable_parameters

    digest = hashlib.sha256()
    for name, param in sorted(trainable_parameters(model), key=lambda item: item[0]):
        tensor = param.full_tensor() if isinstance(param, DTensor) else param
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
