"""The model a training run trains, built fresh or restored from a checkpoint, with its optimizer
and schedule, and wrapped for the run's processes (DDP, or sharded with FSDP2: lumo_core.lm.fsdp).

- A fresh run builds the model from `seed` (the same on every rank), from `init_from`'s weights
  when given; LoRA saves the base model to base/ first and puts adapters on it.
- A resumed run first checks that every file of checkpoint-<step>/ (and base/) is JSON or
  safetensors, then loads the model (LoRA: base/ plus the checkpoint's adapter), the optimizer,
  schedule, this rank's RNG and data stream states (lumo_core.lm.checkpoints).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lumo_core.errors import LumoError
from lumo_core.lm import checkpoints
from lumo_core.lm.checkpoints import BASE

if TYPE_CHECKING:
    import torch

    from lumo_core.lm.distributed import Distributed
    from lumo_core.lm.train_config import TrainConfig
    from lumo_core.uti.token_space import TokenSpace


@dataclass
class Trainer:
    """What the steps of one run share once it is built: the model (sharded in place with FSDP)
    and what the forward pass calls (its DDP wrapper, or itself), the context that holds back
    gradient sync between accumulated micro-batches, the optimizer and schedule, and this rank's
    state (data stream position, token counts)."""

    model: Any
    wrapped: Any
    no_sync: Callable[[], AbstractContextManager[Any]]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    params: list[Any]
    head_index: Any
    device: torch.device
    autocast: Callable[[], AbstractContextManager[Any]]
    rank_state: dict[str, Any]


def build_model(
    config: TrainConfig,
    token_space: TokenSpace,
    out_dir: Path,
    dist: Distributed,
    checkpoint: Path | None,
    init_from: Path | None,
) -> Any:
    """The model to train, on the CPU in fp32: restored from `checkpoint`, or fresh."""
    import torch
    from transformers import AutoModelForCausalLM

    from lumo_core.lm.model import apply_lora, build_model, load_lm

    # Anything random in building the model is drawn from `seed`, the same on every rank.
    torch.manual_seed(config.seed)
    attn = config.model.attn_implementation
    init = (
        checkpoints.load_weights(init_from, token_space, attn) if init_from is not None and checkpoint is None else None
    )
    if checkpoint is not None:
        checkpoints.verify_checkpoint(checkpoint)
        if config.finetune.method == "lora":
            checkpoints.verify_checkpoint(out_dir / BASE)
    if config.finetune.method != "lora":
        if checkpoint is not None:
            return AutoModelForCausalLM.from_pretrained(
                checkpoint, dtype=torch.float32, attn_implementation=attn, use_safetensors=True
            )
        return build_model(config, token_space, init)
    base_dir = out_dir / BASE
    if checkpoint is None:
        base = build_model(config, token_space, init)
        if dist.is_main:
            checkpoints.save_base(out_dir, base)
        dist.barrier()
        model = apply_lora(base, config, token_space)
    else:
        model = apply_lora(load_lm(base_dir), config, token_space)
        checkpoints.load_adapters(model, checkpoint)
    model.peft_config["default"].base_model_name_or_path = str(base_dir.resolve())
    return model


def build_trainer(
    config: TrainConfig,
    token_space: TokenSpace,
    out_dir: Path,
    dist: Distributed,
    device: torch.device,
    checkpoint: Path | None,
    init_from: Path | None,
) -> Trainer:
    """The model on `device`, its optimizer and schedule, restored from `checkpoint` if any,
    and wrapped for the processes of the run."""
    import torch
    from transformers import get_scheduler

    from lumo_core.lm import fsdp
    from lumo_core.lm.heads import model_head_index
    from lumo_core.lm.model import trainable_parameters

    use_bf16 = config.train.precision == "bf16" or (config.train.precision == "auto" and device.type == "cuda")
    sharded = config.train.parallelism == "fsdp" and dist.world_size > 1
    model = build_model(config, token_space, out_dir, dist, checkpoint, init_from).to(device)
    model.train()
    if sharded:
        fsdp.shard(model, use_bf16)
    head_index = model_head_index(model)
    if head_index is not None:
        head_index = head_index.to(device)
    params = [p for _, p in trainable_parameters(model)]
    optimizer = torch.optim.AdamW(
        params,
        lr=config.optim.lr,
        betas=config.optim.betas,
        eps=config.optim.eps,
        weight_decay=config.optim.weight_decay,
        fused=device.type == "cuda",
    )
    scheduler = get_scheduler(
        "cosine_with_min_lr",
        optimizer,
        num_warmup_steps=config.optim.warmup_steps,
        num_training_steps=config.train.max_steps,
        scheduler_specific_kwargs={"min_lr_rate": config.optim.min_lr_ratio},
    )
    rank_state: dict[str, Any] = {"tokens": 0, "pad_tokens": 0}
    if checkpoint is not None:
        rank_state = checkpoints.load_training_state(
            checkpoint, dist.rank, dist.world_size, model, optimizer, scheduler
        )
        # The optimizer holds the rate its last step set; take it from this run's schedule,
        # which differs when max_steps changed (the same value otherwise).
        for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(scheduler.last_epoch)
    else:
        torch.manual_seed(config.seed + dist.rank)

    wrapped, no_sync = model, nullcontext
    if sharded:
        no_sync = partial(fsdp.no_gradient_sync, model)
    elif dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        no_sync = wrapped.no_sync
    # Under FSDP the mixed-precision policy casts the parameters; autocast would cast twice.
    autocast = (
        (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16))
        if use_bf16 and not sharded
        else nullcontext
    )
    return Trainer(model, wrapped, no_sync, optimizer, scheduler, params, head_index, device, autocast, rank_state)


def unsharded_copy(config: TrainConfig, token_space: TokenSpace, out_dir: Path, state: dict[str, Any]) -> Any:
    """A plain CPU model holding a sharded LoRA model's full weights (`state`), so that its
    adapters can be merged for final/ (rank 0 only: the base comes from base/)."""
    from lumo_core.lm.fsdp import tied_aliases
    from lumo_core.lm.model import apply_lora, load_lm

    model = apply_lora(load_lm(out_dir / BASE), config, token_space)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - tied_aliases(model):
        raise LumoError(
            f"the gathered weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model
