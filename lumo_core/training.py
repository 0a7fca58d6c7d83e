"""The token LM training loop: plain PyTorch, one process or many (torchrun, DDP).

A step takes `grad_accum_steps` micro-batches; the loss is the mean over every supervised token
of the step on every rank (sums, then one division by the global count), so accumulation and
DDP do not reweight tokens. Warm-up then cosine decay, gradient clipping, bf16 autocast on CUDA.

Outputs go under lm_checkpoint/ in the layout of lumo_core.checkpoints (checkpoint-<step>/,
`latest`, base/, final/, train_log.jsonl), which also writes and reads them.
A run resumes from `latest` when the trajectory settings, the token space and the shards are
the ones it was started with; otherwise it starts over.

Run several processes with `torchrun --nproc-per-node N -m lumo_core.torchrun_train` (gloo on
CPU, nccl on CUDA; see lumo_core.distributed); every rank reads a disjoint part of the data (see
lumo_core.lm_data).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from lumo_core import checkpoints
from lumo_core.checkpoints import BASE, FINAL, TRAIN_LOG
from lumo_core.config import Settings
from lumo_core.distributed import Distributed, resolve_device
from lumo_core.errors import LumoError, MissingUpstreamError
from lumo_core.reporting import Reporter
from lumo_core.token_space import TokenSpace, canonical_json_bytes, sha256_hex
from lumo_core.train_config import TrainConfig, load_train_config


def token_loss_sum(logits: Any, labels: Any) -> Any:
    """Summed next-token cross-entropy over the supervised positions (labels are unshifted)."""
    import torch.nn.functional as F

    from lumo_core.sequences import IGNORE_INDEX

    # Shifting the labels left (not the logits right) avoids copying the logits.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def run_identity(config: TrainConfig, token_space: TokenSpace, shards_dir: Path) -> str:
    """What a checkpoint must share with a run to be resumed by it."""
    recipe = {
        "trajectory": config.trajectory_fingerprint(),
        "token_space_sha256": token_space.sha256,
        "shards_index_sha256": sha256_hex((shards_dir / "index.json").read_bytes()),
    }
    return sha256_hex(canonical_json_bytes(recipe))


class TrainingRun:
    """One training run of `config` on the shards, writing into `out_dir` (see module doc)."""

    def __init__(self, config: TrainConfig, token_space: TokenSpace, shards_dir: Path, out_dir: Path, reporter: Reporter, dist: Distributed) -> None:
        self.config = config
        self.token_space = token_space
        self.shards_dir = Path(shards_dir)
        self.out_dir = Path(out_dir)
        self.reporter = reporter
        self.dist = dist
        self.identity = run_identity(config, token_space, self.shards_dir)
        self.lora = config.finetune.method == "lora"

    # ------------------------------------------------------------------ helpers
    def _log(self, message: str) -> None:
        if self.dist.is_main:
            self.reporter.log(message)

    def _resume_point(self) -> tuple[Path | None, dict[str, Any] | None]:
        """The checkpoint to resume from, clearing a previous run's outputs when they belong to
        another configuration, token space or shard set."""
        checkpoint, state = checkpoints.latest_state(self.out_dir)
        # Every rank has read the pointer before rank 0 may clear the folder.
        self.dist.barrier()
        if state is not None and state["run_identity"] == self.identity:
            if state["world_size"] != self.dist.world_size:
                raise LumoError(
                    f"{checkpoint} was written by {state['world_size']} processes, this run has {self.dist.world_size}: "
                    f"resume with the same number, or delete {self.out_dir} to start over"
                )
            return checkpoint, state
        leftovers = self.out_dir.is_dir() and any(self.out_dir.iterdir())
        if self.dist.is_main and leftovers:
            reason = "its settings, token space or shards differ from this run's" if state else "it holds no complete checkpoint"
            self.reporter.log(f"starting over in {self.out_dir}: {reason}")
            checkpoints.clear_run(self.out_dir)
        self.dist.barrier()
        return None, None

    def _build(self, checkpoint: Path | None) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        from lumo_core.lm_model import apply_lora, build_model, load_lm

        attn = self.config.model.attn_implementation
        if not self.lora:
            if checkpoint is not None:
                return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation=attn)
            return build_model(self.config, self.token_space)
        base_dir = self.out_dir / BASE
        if checkpoint is None:
            base = build_model(self.config, self.token_space)
            if self.dist.is_main:
                checkpoints.save_base(self.out_dir, base)
            self.dist.barrier()
            model = apply_lora(base, self.config, self.token_space)
        else:
            model = apply_lora(load_lm(base_dir), self.config, self.token_space)
            checkpoints.load_adapters(model, checkpoint)
        model.peft_config["default"].base_model_name_or_path = str(base_dir.resolve())
        return model

    # --------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        import torch
        from transformers import get_scheduler

        from lumo_core.lm_data import BatchPlan, TrainStream, make_loader, open_split
        from lumo_core.lm_model import (
            parameter_counts,
            trainable_digest,
            trainable_parameters,
        )

        config, dist = self.config, self.dist
        if config.train.torch_threads:
            torch.set_num_threads(config.train.torch_threads)
        device = resolve_device(config.train.device, dist.local_rank)
        if device.type == "cuda":
            # NCCL collectives (and all_gather_object) use the current device.
            torch.cuda.set_device(device)
        split = open_split(self.shards_dir, "train", self.token_space.sha256)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint, state = self._resume_point()
        finished = state is not None and state["step"] >= config.train.max_steps
        summary = checkpoints.final_summary(self.out_dir) if finished else None
        if summary is not None and summary.get("run_identity") == self.identity:
            self._log(f"{self.out_dir / FINAL} is already trained with these settings: nothing to do")
            return {**summary, "reused": True}
        start_step = state["step"] if state else 0
        if checkpoint is not None:
            self._log(f"resuming from {checkpoint} (step {start_step})")
        if dist.is_main:
            checkpoints.truncate_jsonl(self.out_dir / TRAIN_LOG, start_step)
        ids_log = checkpoints.sample_ids_log(self.out_dir, dist.rank)
        if config.train.record_sample_ids:
            ids_log.parent.mkdir(parents=True, exist_ok=True)
            checkpoints.truncate_jsonl(ids_log, start_step)

        model = self._build(checkpoint).to(device)
        model.train()
        params = [p for _, p in trainable_parameters(model)]
        optimizer = torch.optim.AdamW(
            params, lr=config.optim.lr, betas=config.optim.betas, eps=config.optim.eps,
            weight_decay=config.optim.weight_decay, fused=device.type == "cuda",
        )
        scheduler = get_scheduler(
            "cosine_with_min_lr", optimizer, num_warmup_steps=config.optim.warmup_steps,
            num_training_steps=config.train.max_steps, scheduler_specific_kwargs={"min_lr_rate": config.optim.min_lr_ratio},
        )
        rank_state: dict[str, Any] = {"slot_states": {}, "tokens": 0, "pad_tokens": 0}
        if checkpoint is not None:
            rank_state = checkpoints.load_training_state(checkpoint, dist.rank, optimizer, scheduler, device)
        else:
            torch.manual_seed(config.seed + dist.rank)

        ddp_model = model
        if dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        use_bf16 = config.train.precision == "bf16" or (config.train.precision == "auto" and device.type == "cuda")
        autocast = (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

        plan = BatchPlan.from_config(config, split, self.token_space.special_id("<|pad_mm|>"))
        accum = config.optim.grad_accum_steps
        stream = TrainStream(plan, dist.rank, dist.world_size, config.data.num_workers, start_step * accum, rank_state["slot_states"])
        batches = iter(make_loader(stream, config.data.num_workers, pin_memory=device.type == "cuda"))
        counts = parameter_counts(model)
        self._log(
            f"{config.finetune.method} fine-tuning, {counts['trainable']:,} of {counts['total']:,} parameters trainable, "
            f"{dist.world_size} process(es) on {device}, steps {start_step}..{config.train.max_steps}"
        )

        interval = {"loss": 0.0, "targets": 0.0, "tokens": 0.0, "pad": 0.0}
        interval_started = started = time.perf_counter()
        session_tokens = 0.0
        last_stderr = 0.0
        last_entry: dict[str, Any] = {}
        for step in range(start_step + 1, config.train.max_steps + 1):
            micro_batches = [next(batches) for _ in range(accum)]
            local = [sum(mb.n_target_tokens for mb in micro_batches), sum(mb.n_real_tokens for mb in micro_batches), sum(mb.n_pad_tokens for mb in micro_batches)]
            global_targets, global_tokens, global_pad = dist.sum(local, device)
            step_loss = torch.zeros((), dtype=torch.float64, device=device)
            for index, mb in enumerate(micro_batches):
                syncing = dist.world_size == 1 or index == accum - 1
                with (nullcontext() if syncing else ddp_model.no_sync()):
                    with autocast():
                        logits = ddp_model(**mb.model_inputs(device), use_cache=False).logits
                    loss_sum = token_loss_sum(logits, mb.labels.to(device, non_blocking=True))
                    # DDP averages gradients over ranks; scaling by world size turns that into a sum.
                    (loss_sum * dist.world_size / max(global_targets, 1.0)).backward()
                step_loss += loss_sum.detach().double()
                rank_state["slot_states"][mb.slot] = mb.state
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            rank_state["tokens"] += local[1]
            rank_state["pad_tokens"] += local[2]
            session_tokens += global_tokens
            interval["targets"] += global_targets
            interval["tokens"] += global_tokens
            interval["pad"] += global_pad
            interval["loss"] += float(step_loss)
            if config.train.record_sample_ids:
                with open(ids_log, "a") as handle:
                    handle.write(json.dumps({"step": step, "ids": [i for mb in micro_batches for i in mb.sample_ids]}) + "\n")

            if step % config.train.log_every == 0 or step == config.train.max_steps:
                (loss_total,) = dist.sum([interval["loss"]], device)
                now = time.perf_counter()
                last_entry = {
                    "step": step,
                    "loss": loss_total / max(interval["targets"], 1.0),
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm),
                    "stage": plan.stage_at(step - 1).name,
                    "tokens": interval["tokens"],
                    "tokens_per_s": interval["tokens"] / max(now - interval_started, 1e-9),
                    "padding_share": interval["pad"] / max(interval["pad"] + interval["tokens"], 1.0),
                    "elapsed_s": now - started,
                }
                if dist.is_main:
                    with open(self.out_dir / TRAIN_LOG, "a") as handle:
                        handle.write(json.dumps(last_entry, sort_keys=True) + "\n")
                    if now - last_stderr >= self.reporter.progress_interval_s or step == config.train.max_steps:
                        last_stderr = now
                        self.reporter.log(
                            f"step {step}/{config.train.max_steps} loss {last_entry['loss']:.4f} lr {last_entry['lr']:.2e} "
                            f"{last_entry['tokens_per_s']:.0f} tokens/s padding {last_entry['padding_share']:.1%} ({last_entry['stage']})"
                        )
                interval = {"loss": 0.0, "targets": 0.0, "tokens": 0.0, "pad": 0.0}
                interval_started = now
            if (config.train.save_every and step % config.train.save_every == 0) or step == config.train.max_steps:
                self._save_checkpoint(step, model, optimizer, scheduler, rank_state)
        train_seconds = time.perf_counter() - started
        if not last_entry and (self.out_dir / TRAIN_LOG).is_file():
            # Resumed at the last step (the final model was not written yet): nothing was logged now.
            last_entry = json.loads((self.out_dir / TRAIN_LOG).read_text().splitlines()[-1])

        rank_digests = dist.gather(trainable_digest(model))
        overlong: Counter[str] = Counter()
        for rank_skips in dist.gather([dict(st.skipped_overlong) for st in rank_state["slot_states"].values()]):
            for skips in rank_skips:
                overlong.update(skips)
        if overlong:
            self._log(f"samples longer than block_size {config.data.block_size} were passed over (each time met): {dict(sorted(overlong.items()))}")
        tokens_all, pad_all = dist.sum([rank_state["tokens"], rank_state["pad_tokens"]], device)
        summary = {
            "run_identity": self.identity,
            "steps": config.train.max_steps,
            "resumed_from_step": start_step or None,
            "final_loss": last_entry.get("loss"),
            "tokens_per_s": session_tokens / max(train_seconds, 1e-9),
            "tokens_seen": tokens_all,
            "padding_share": pad_all / max(tokens_all + pad_all, 1.0),
            "packing": config.data.packing,
            "overlong_samples_skipped": dict(sorted(overlong.items())),
            "method": config.finetune.method,
            "trainable_parameters": counts["trainable"],
            "total_parameters": counts["total"],
            "world_size": dist.world_size,
            "device": str(device),
            "vocab_size": self.token_space.vocab_size_total,
            "token_space_sha256": self.token_space.sha256,
            "rank_weights_sha256": rank_digests,
            "weights_in_sync": len(set(rank_digests)) == 1,
            "checkpoint": str(self.out_dir / FINAL),
            "reused": False,
        }
        if dist.is_main:
            checkpoints.save_final(self.out_dir, model, self.token_space, summary)
        dist.barrier()
        return summary

    # ------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, step: int, model: Any, optimizer: Any, scheduler: Any, rank_state: dict[str, Any]) -> None:
        run_state = {
            "max_steps": self.config.train.max_steps,
            "run_identity": self.identity,
            "world_size": self.dist.world_size,
            "num_workers": self.config.data.num_workers,
            "method": self.config.finetune.method,
            "token_space_sha256": self.token_space.sha256,
        }
        checkpoints.save_checkpoint(
            self.out_dir, step, model=model, optimizer=optimizer, scheduler=scheduler, rank_state=rank_state,
            token_space=self.token_space, run_state=run_state, dist=self.dist, keep=self.config.train.keep_checkpoints,
        )


def train_inputs(settings: Settings) -> tuple[TokenSpace, Path]:
    """The token space and shard folder a training run needs, or MissingUpstreamError."""
    token_space_path = settings.step_dir("token_space") / "token_space.json"
    if not token_space_path.is_file():
        raise MissingUpstreamError(f"{token_space_path} not found: build the token space first (`lumo token-space`, the `token_space` asset)")
    shards_dir = settings.step_dir("tokenized_shards")
    if not (shards_dir / "index.json").is_file():
        raise MissingUpstreamError(
            f"{shards_dir / 'index.json'} not found: tokenize first (`lumo tokenize`, or "
            "`dagster asset materialize -m lumo_pipeline --select '*tokenized_shards'`)"
        )
    return TokenSpace.read(token_space_path), shards_dir


def run_train(settings: Settings, reporter: Reporter, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (or resume training) the token LM on settings.output_dir/tokenized_shards.

    Under torchrun every rank calls this; rank 0 reports the materialization (the Dagster check
    `vocab_matches_token_space` is standalone: it reads the checkpoint's config.json)."""
    from transformers.utils import logging as hf_logging

    from lumo_core.fileio import file_sha256
    from lumo_core.lm_model import check_vocab, load_lm

    hf_logging.disable_progress_bar()
    config = load_train_config(settings.train_config, overrides)
    token_space, shards_dir = train_inputs(settings)
    dist = Distributed.start(config.train.device)
    try:
        summary = TrainingRun(config, token_space, shards_dir, settings.step_dir("lm_checkpoint"), reporter, dist).run()
    finally:
        dist.stop()
    if not dist.is_main:
        return summary
    final = Path(summary["checkpoint"])
    vocab = check_vocab(load_lm(final), token_space)
    weights_sha = file_sha256(final / "model.safetensors")
    summary["weights_file_sha256"] = weights_sha
    reporter.report_materialization(
        metadata={
            "checkpoint": str(final),
            "steps": summary["steps"],
            "final_loss": summary["final_loss"],
            "tokens_per_s": summary["tokens_per_s"],
            "padding_share": summary["padding_share"],
            "method": summary["method"],
            "trainable_parameters": summary["trainable_parameters"],
            "vocab_size": summary["vocab_size"],
            "token_space_sha256": summary["token_space_sha256"],
            "world_size": summary["world_size"],
            "resumed_from_step": summary["resumed_from_step"],
        },
        data_version=weights_sha,
    )
    summary["vocab_matches_token_space"] = bool(vocab["passed"])
    return summary

