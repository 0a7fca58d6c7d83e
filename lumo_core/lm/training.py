"""The token LM training loop: plain PyTorch, one process or many (torchrun, DDP).

A step takes `grad_accum_steps` micro-batches; the loss is the mean over every supervised token
of the step on every rank (sums, then one division by the global count), so accumulation and
DDP do not reweight tokens. Warm-up then cosine decay, gradient clipping, bf16 autocast on CUDA.

Outputs go under lm_checkpoint/ in the layout of lumo_core.lm.checkpoints (checkpoint-<step>/,
`latest`, base/, final/, train_log.jsonl), which also writes and reads them.

A run resumes from `latest` when the trajectory settings, the token space, the shards and the
starting weights are the ones it was started with. A run never deletes a checkpoint: when they
differ it refuses, naming the changed settings and the ways on:
- `train.max_steps` is not part of that identity: a finished or stopped run continues to a larger
  `max_steps`. The cosine schedule is then computed over the new total, as the Hugging Face
  Trainer does on resume: from the checkpoint's step on, the learning rate is the one a run
  started with the new `max_steps` would have there (it rises again from where the shorter
  schedule had brought it). The finished run's final/ is kept as final-step<N>/, and its last
  checkpoint is never pruned.
- `new_run` (`lumo train --new-run`) moves the run folder whole to a sibling of its own name and
  starts a new run; `init_from` (`lumo train --init-from PATH`) does the same and starts from any
  checkpoint's weights (a model folder, or a LoRA checkpoint merged into its base), with a fresh
  optimizer and schedule.

Fresh runs are reproducible: the model, its LoRA adapters and the training RNG are seeded from
`seed`, the same on every rank (DDP also broadcasts rank 0's weights), so two fresh runs with
the same settings end in the same weights, bit for bit.

Run several processes with `torchrun --nproc-per-node N -m lumo_core.torchrun_train` (gloo on
CPU, nccl on CUDA; see lumo_core.lm.distributed); the ranks share each step's global batch and each
reads only its own samples (see lumo_core.lm.data). A checkpoint resumes on any number of processes
and loader workers at the same global batch (micro_batch_size x grad_accum_steps x processes).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from lumo_core.config import Settings
from lumo_core.errors import LumoError, MissingUpstreamError, rebuild_hint
from lumo_core.fileio import canonical_json_bytes, sha256_hex
from lumo_core.lm import checkpoints
from lumo_core.lm.checkpoints import BASE, FINAL, TRAIN_LOG
from lumo_core.lm.data import RESUME_MAY_CHANGE, check_global_batch, data_source_sha256, global_batch
from lumo_core.lm.distributed import Distributed, resolve_device
from lumo_core.lm.train_config import TrainConfig, load_train_config
from lumo_core.reporting import Reporter
from lumo_core.uti.token_space import TokenSpace


def token_loss_sum(logits: Any, labels: Any, head_index: Any = None) -> Any:
    """Summed next-token cross-entropy over the supervised positions (labels are unshifted).
    With modality heads (`head_index`, see lumo_core.lm.heads) each target's softmax runs
    over its own head's ids only."""
    import torch.nn.functional as F

    from lumo_core.lm.heads import restrict_to_target_heads
    from lumo_core.uti.sequences import IGNORE_INDEX

    # Shifting the labels left (not the logits right) avoids copying the logits.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    logits = restrict_to_target_heads(logits.float(), targets, head_index)
    return F.cross_entropy(
        logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def run_recipe(
    config: TrainConfig, token_space: TokenSpace, shards_dir: Path, init_sha256: str | None = None
) -> dict[str, Any]:
    """What a checkpoint must share with a run to be resumed by it, as dotted keys."""
    return {
        # How the global batch is split may change on resume (lumo_core.lm.plan); its size may not.
        **{k: v for k, v in config.trajectory_settings().items() if k not in RESUME_MAY_CHANGE},
        "token_space_sha256": token_space.sha256,
        # The shards' index.json, or the `data.jsonl` source's (lumo_core.lm.data).
        "shards_index_sha256": data_source_sha256(config, shards_dir),
        "init_from_weights_sha256": init_sha256,
    }


def run_identity(recipe: dict[str, Any]) -> str:
    return sha256_hex(canonical_json_bytes(recipe))


def changed_settings(recorded: dict[str, Any] | None, current: dict[str, Any]) -> str:
    """`key old -> new` for each recipe entry that differs (a checkpoint that recorded only a
    fingerprint names none)."""
    if recorded is None:
        return "the settings, token space or shards (this checkpoint recorded only their fingerprint)"

    def shown(entries: dict[str, Any], key: str) -> str:
        # A setting this version has and the checkpoint's did not (or the reverse) shows as such.
        return json.dumps(entries[key], sort_keys=True) if key in entries else "(absent)"

    keys = sorted(set(recorded) | set(current))
    changes = [
        f"{key} {shown(recorded, key)} -> {shown(current, key)}"
        for key in keys
        if shown(recorded, key) != shown(current, key)
    ]
    listed = changes[:6] + ([f"and {len(changes) - 6} more"] if len(changes) > 6 else [])
    return "; ".join(listed)


class TrainingRun:
    """One training run of `config` on the shards, writing into `out_dir` (see module doc)."""

    def __init__(
        self,
        config: TrainConfig,
        token_space: TokenSpace,
        shards_dir: Path,
        out_dir: Path,
        reporter: Reporter,
        dist: Distributed,
        init_from: Path | None = None,
        new_run: bool = False,
    ) -> None:
        self.config = config
        self.token_space = token_space
        self.shards_dir = Path(shards_dir)
        self.out_dir = Path(out_dir)
        self.reporter = reporter
        self.dist = dist
        self.init_from = Path(init_from).resolve() if init_from is not None else None
        self.new_run = new_run or init_from is not None
        init_sha = checkpoints.weights_sha256(self.init_from) if self.init_from is not None else None
        self.recipe = run_recipe(config, token_space, self.shards_dir, init_sha)
        self.identity = run_identity(self.recipe)
        self.lora = config.finetune.method == "lora"
        self.previous_run: Path | None = None
        # The data plan's state after the last step trained (lumo_core.lm.plan), JSON.
        self.data_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ helpers
    def _log(self, message: str) -> None:
        if self.dist.is_main:
            self.reporter.log(message)

    def _resume_point(self) -> tuple[Path | None, dict[str, Any] | None]:
        """The checkpoint to resume from. A run folder holding another run's checkpoints is set
        aside whole with `new_run`, and refused otherwise; only leftovers of a run that never
        completed a checkpoint are cleared."""
        checkpoint, state = checkpoints.latest_state(self.out_dir)
        held = checkpoints.holds_models(self.out_dir)
        # Every rank has read the folder before rank 0 may change it.
        self.dist.barrier()
        max_steps = self.config.train.max_steps
        if state is not None and state["run_identity"] == self.identity:
            self._check_data_state(checkpoint, state)
            if state["step"] > max_steps:
                raise LumoError(
                    f"{checkpoint} is at step {state['step']}, past train.max_steps {max_steps}: nothing was deleted; "
                    f"set train.max_steps to {state['step']} or more to keep that run, or start a new run from one of its "
                    f"checkpoints with `lumo train --init-from {self.out_dir}/checkpoint-<step>`"
                )
            return checkpoint, state
        if held and not self.new_run:
            if state is not None:
                found = f"a run at step {state['step']} whose settings differ from this run's: {changed_settings(state.get('recipe'), self.recipe)}"
            else:
                found = "checkpoints but no complete `latest` pointer, so they cannot be told to be this run's"
            dirs = checkpoints.checkpoint_dirs(self.out_dir)
            source = checkpoint or (dirs[-1] if dirs else self.out_dir / FINAL)
            raise LumoError(
                f"{self.out_dir} holds {found}. Nothing was deleted. "
                f"Ways on: go back to its settings to resume it (train.max_steps may grow, to continue it); "
                f"`lumo train --new-run` moves it whole to {checkpoints.kept_run_name(self.out_dir, state)} and starts this run; "
                f"`lumo train --init-from {source}` does the same and starts from those weights; or train into another --output-dir"
            )
        if self.dist.is_main and self.out_dir.is_dir() and any(self.out_dir.iterdir()):
            if held:
                target = checkpoints.kept_run_name(self.out_dir, state)
                checkpoints.set_run_aside(self.out_dir, target)
                self.previous_run = target
                self.reporter.log(f"the previous run in {self.out_dir} is kept whole as {target}; starting a new run")
            else:
                self.reporter.log(
                    f"clearing {self.out_dir}: it holds no complete checkpoint, only leftovers of a run that stopped before one"
                )
                checkpoints.clear_leftovers(self.out_dir)
        self.previous_run = self.dist.gather(self.previous_run)[0]
        if (
            self.previous_run is not None
            and self.init_from is not None
            and self.init_from.is_relative_to(self.out_dir.resolve())
        ):
            # The weights to start from were inside the folder just set aside.
            self.init_from = self.previous_run.resolve() / self.init_from.relative_to(self.out_dir.resolve())
        self.dist.barrier()
        return None, None

    def _build(self, checkpoint: Path | None) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        from lumo_core.lm.model import apply_lora, build_model, load_lm

        # Anything random in building the model is drawn from `seed`, the same on every rank.
        torch.manual_seed(self.config.seed)
        attn = self.config.model.attn_implementation
        init = (
            checkpoints.load_weights(self.init_from, self.token_space, attn)
            if self.init_from is not None and checkpoint is None
            else None
        )
        if not self.lora:
            if checkpoint is not None:
                return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation=attn)
            return build_model(self.config, self.token_space, init)
        base_dir = self.out_dir / BASE
        if checkpoint is None:
            base = build_model(self.config, self.token_space, init)
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

        from lumo_core.lm.data import open_train_split, sample_ids_line
        from lumo_core.lm.heads import model_head_index
        from lumo_core.lm.model import (
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
        split = open_train_split(config, self.shards_dir, self.token_space.sha256)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint, state = self._resume_point()
        finished = state is not None and state["step"] >= config.train.max_steps
        summary = checkpoints.final_summary(self.out_dir) if finished else None
        if summary is not None and summary.get("run_identity") == self.identity:
            self._log(f"{self.out_dir / FINAL} is already trained with these settings: nothing to do")
            return {**summary, "reused": True}
        start_step = state["step"] if state else 0
        continued_from = state.get("max_steps") if state and state.get("max_steps") != config.train.max_steps else None
        if continued_from is not None:
            kept = None
            if dist.is_main and start_step == continued_from:
                kept = checkpoints.keep_final(self.out_dir, start_step)
            dist.barrier()
            self._log(
                f"continuing {checkpoint} (step {start_step}, trained to max_steps {continued_from}) to max_steps {config.train.max_steps}: "
                f"the cosine schedule is recomputed over {config.train.max_steps} steps"
                + (f"; its final model is kept as {kept}" if kept else "")
            )
        elif checkpoint is not None:
            self._log(f"resuming from {checkpoint} (step {start_step})")
        if dist.is_main:
            checkpoints.truncate_jsonl(self.out_dir / TRAIN_LOG, start_step)
        ids_log = checkpoints.sample_ids_log(self.out_dir, dist.rank)
        if config.train.record_sample_ids:
            ids_log.parent.mkdir(parents=True, exist_ok=True)
            checkpoints.truncate_jsonl(ids_log, start_step)
            if dist.is_main:
                # Ranks of a larger run this one resumes (with fewer processes) log no more.
                for other in sorted(ids_log.parent.glob("rank-*.jsonl")):
                    if int(other.stem.removeprefix("rank-")) >= dist.world_size:
                        checkpoints.truncate_jsonl(other, start_step)

        model = self._build(checkpoint).to(device)
        model.train()
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
            rank_state = checkpoints.load_training_state(checkpoint, dist.rank, optimizer, scheduler, device)
            # The optimizer holds the rate its last step set; take it from this run's schedule,
            # which differs when max_steps changed (the same value otherwise).
            for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["lr"] = base_lr * factor(scheduler.last_epoch)
        else:
            torch.manual_seed(config.seed + dist.rank)

        ddp_model = model
        if dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        use_bf16 = config.train.precision == "bf16" or (config.train.precision == "auto" and device.type == "cuda")
        autocast = (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

        accum = config.optim.grad_accum_steps
        plan, batches = self._data_stream(split, state, device)
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
            local = [
                sum(mb.n_target_tokens for mb in micro_batches),
                sum(mb.n_real_tokens for mb in micro_batches),
                sum(mb.n_pad_tokens for mb in micro_batches),
            ]
            global_targets, global_tokens, global_pad = dist.sum(local, device)
            step_loss = torch.zeros((), dtype=torch.float64, device=device)
            for index, mb in enumerate(micro_batches):
                syncing = dist.world_size == 1 or index == accum - 1
                with nullcontext() if syncing else ddp_model.no_sync():
                    with autocast():
                        logits = ddp_model(**mb.model_inputs(device), use_cache=False).logits
                    loss_sum = token_loss_sum(logits, mb.labels.to(device, non_blocking=True), head_index)
                    # DDP averages gradients over ranks; scaling by world size turns that into a sum.
                    (loss_sum * dist.world_size / max(global_targets, 1.0)).backward()
                step_loss += loss_sum.detach().double()
                self.data_state = mb.data_state
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
                    handle.writelines(sample_ids_line(step, mb) for mb in micro_batches)

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
        # The plan is global: its count is every rank's.
        overlong = Counter(self.data_state["skipped_overlong"] if self.data_state else {})
        if overlong:
            self._log(
                f"samples longer than block_size {config.data.block_size} were passed over (each time met): {dict(sorted(overlong.items()))}"
            )
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
            "modality_heads": config.model.modality_heads,
            "continued_from_max_steps": continued_from,
            "init_from": str(self.init_from) if self.init_from is not None else None,
            "previous_run_kept_as": str(self.previous_run) if self.previous_run is not None else None,
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

    # -------------------------------------------------------------------- data
    def _check_data_state(self, checkpoint: Path, state: dict[str, Any]) -> None:
        """Refuse a checkpoint whose global batch differs from this run's (the world size and the
        split of the global batch may change)."""
        data = self.config.data
        batch = global_batch(data.micro_batch_size, self.config.optim.grad_accum_steps, self.dist.world_size)
        check_global_batch(state.get("data"), batch, str(checkpoint))

    def _data_stream(self, split: Any, state: dict[str, Any] | None, device: Any) -> tuple[Any, Any]:
        """The plan and this rank's micro-batches, from the checkpoint's data state (a JSON
        object in trainer_state.json, the same for every rank) or the start."""
        from lumo_core.lm.data import BatchPlan, TrainStream, make_loader

        config, dist = self.config, self.dist
        plan = BatchPlan.from_config(config, split, self.token_space.special_id("<|pad_mm|>"), dist.world_size)
        self.data_state = state["data"] if state else None
        stream = TrainStream(plan, dist.rank, config.data.num_workers, self.data_state)
        return plan, iter(make_loader(stream, config.data.num_workers, pin_memory=device.type == "cuda"))

    # ------------------------------------------------------------- checkpoints
    def _save_checkpoint(
        self, step: int, model: Any, optimizer: Any, scheduler: Any, rank_state: dict[str, Any]
    ) -> None:
        run_state = {
            "max_steps": self.config.train.max_steps,
            "run_identity": self.identity,
            "recipe": self.recipe,
            "world_size": self.dist.world_size,
            "num_workers": self.config.data.num_workers,
            "data": self.data_state,
            "method": self.config.finetune.method,
            "token_space_sha256": self.token_space.sha256,
        }
        checkpoints.save_checkpoint(
            self.out_dir,
            step,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            rank_state=rank_state,
            token_space=self.token_space,
            run_state=run_state,
            dist=self.dist,
            keep=self.config.train.keep_checkpoints,
        )


def train_inputs(settings: Settings, need_shards: bool = True) -> tuple[TokenSpace, Path]:
    """The token space and shard folder a training run needs, or MissingUpstreamError
    (`need_shards=False`: a run on `data.jsonl` needs no shards)."""
    token_space_path = settings.layout.token_space / "token_space.json"
    if not token_space_path.is_file():
        raise MissingUpstreamError(
            f"{token_space_path} not found: build the token space first: {rebuild_hint('token_space', 'lumo token-space')}"
        )
    shards_dir = settings.layout.tokenized_shards
    if need_shards and not (shards_dir / "index.json").is_file():
        raise MissingUpstreamError(
            f"{shards_dir / 'index.json'} not found: tokenize first: "
            f"{rebuild_hint('tokenized_shards', 'lumo tokenize')}"
        )
    return TokenSpace.read(token_space_path), shards_dir


def run_train(
    settings: Settings,
    reporter: Reporter,
    overrides: dict[str, Any] | None = None,
    init_from: str | Path | None = None,
    new_run: bool = False,
) -> dict[str, Any]:
    """Train (or resume, or continue) the token LM on settings.output_dir/tokenized_shards.
    `new_run` sets a run of other settings aside instead of refusing; `init_from` starts a new run
    from a checkpoint's weights (see the module doc).

    Under torchrun every rank calls this; rank 0 reports the materialization (the Dagster check
    `vocab_matches_token_space` is standalone: it reads the checkpoint's config.json)."""
    from transformers.utils import logging as hf_logging

    from lumo_core.fileio import file_sha256
    from lumo_core.lm.model import check_vocab, load_lm

    hf_logging.disable_progress_bar()
    config = load_train_config(settings.train_config, overrides)
    token_space, shards_dir = train_inputs(settings, need_shards=config.data.jsonl is None)
    dist = Distributed.start(config.train.device)
    try:
        summary = TrainingRun(
            config, token_space, shards_dir, settings.layout.lm_checkpoint, reporter, dist, init_from, new_run
        ).run()
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
