"""The token LM training loop: plain PyTorch, one process or many (torchrun: DDP, or FSDP2).

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

`TrainingRun.run` is a sequence of named steps: `_resume_point` (lumo_core.lm.run_state),
`_prepare_outputs`, the model and optimizer (lumo_core.lm.trainer), `_data_stream`, then per step
`_train_step`, `_log_step` and `_maybe_checkpoint`, and `_finish`.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lumo_core.config import Settings
from lumo_core.errors import MissingUpstreamError, rebuild_hint
from lumo_core.lm import checkpoints, fsdp
from lumo_core.lm.checkpoints import FINAL, TRAIN_LOG
from lumo_core.lm.data import global_batch, sample_ids_line
from lumo_core.lm.distributed import Distributed, resolve_device
from lumo_core.lm.loss import token_loss_sum
from lumo_core.lm.pruning import prune_earlier_finals
from lumo_core.lm.run_state import resume_point, run_identity, run_recipe
from lumo_core.lm.train_config import TrainConfig, load_train_config
from lumo_core.lm.trainer import Trainer, build_trainer, unsharded_copy
from lumo_core.reporting import Reporter
from lumo_core.uti.token_space import TokenSpace

if TYPE_CHECKING:
    from lumo_core.lm.data import BatchPlan, MicroBatch, SplitShards


@dataclass
class _Interval:
    """Sums over the steps since the last log line (global over ranks, except `loss`)."""

    loss: float = 0.0
    targets: float = 0.0
    tokens: float = 0.0
    pad: float = 0.0
    started: float = field(default_factory=time.perf_counter)


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
        self.previous_run: Path | None = None
        # The data plan's state after the last step trained (lumo_core.lm.plan), JSON.
        self.data_state: dict[str, Any] | None = None

    def _log(self, message: str) -> None:
        if self.dist.is_main:
            self.reporter.log(message)

    # --------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        import torch

        config, dist = self.config, self.dist
        if config.train.torch_threads:
            torch.set_num_threads(config.train.torch_threads)
        device = resolve_device(config.train.device, dist.local_rank)
        if device.type == "cuda":
            # NCCL collectives (and all_gather_object) use the current device.
            torch.cuda.set_device(device)
        from lumo_core.lm.data import open_train_split

        split = open_train_split(config, self.shards_dir, self.token_space.sha256)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint, state = self._resume_point()
        finished = state is not None and state["step"] >= config.train.max_steps
        summary = checkpoints.final_summary(self.out_dir) if finished else None
        if summary is not None and summary.get("run_identity") == self.identity:
            self._log(f"{self.out_dir / FINAL} is already trained with these settings: nothing to do")
            return {**summary, "reused": True}
        start_step = state["step"] if state else 0
        continued_from = self._prepare_outputs(checkpoint, state, start_step)
        trainer = build_trainer(config, self.token_space, self.out_dir, dist, device, checkpoint, self.init_from)
        plan, batches = self._data_stream(split, state, trainer)
        from lumo_core.lm.model import parameter_counts

        counts = parameter_counts(trainer.model)
        self._log(
            f"{config.finetune.method} fine-tuning, {counts['trainable']:,} of {counts['total']:,} parameters trainable, "
            f"{dist.world_size} process(es) on {device}, steps {start_step}..{config.train.max_steps}"
        )
        interval = _Interval()
        started = interval.started
        session_tokens = 0.0
        self._last_stderr = 0.0
        last_entry: dict[str, Any] = {}
        for step in range(start_step + 1, config.train.max_steps + 1):
            grad_norm, step_tokens = self._train_step(step, trainer, batches, interval)
            session_tokens += step_tokens
            if step % config.train.log_every == 0 or step == config.train.max_steps:
                last_entry = self._log_step(step, trainer, plan, interval, grad_norm, started)
                interval = _Interval()
            self._maybe_checkpoint(step, trainer)
        return self._finish(trainer, start_step, continued_from, session_tokens, started, last_entry, counts)

    # ------------------------------------------------------------------- steps
    def _resume_point(self) -> tuple[Path | None, dict[str, Any] | None]:
        """The checkpoint to resume from (lumo_core.lm.run_state.resume_point)."""
        point = resume_point(
            self.out_dir,
            self.identity,
            self.recipe,
            self.config.train,
            self.dist,
            self.reporter,
            self.new_run,
            self.init_from,
            global_batch(self.config.data.micro_batch_size, self.config.optim.grad_accum_steps, self.dist.world_size),
        )
        self.previous_run, self.init_from = point.previous_run, point.init_from
        return point.checkpoint, point.state

    def _prepare_outputs(self, checkpoint: Path | None, state: dict[str, Any] | None, start_step: int) -> int | None:
        """Keep a finished run's final/ when it is continued, and drop the log lines a resumed
        run writes again. Returns the max_steps a continued run was trained to, or None."""
        config, dist = self.config, self.dist
        continued_from = state.get("max_steps") if state and state.get("max_steps") != config.train.max_steps else None
        if continued_from is not None:
            kept = None
            if dist.is_main and start_step == continued_from:
                kept = checkpoints.keep_final(self.out_dir, start_step)
                prune_earlier_finals(self.out_dir, config.train.keep_earlier_finals)
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
        self.ids_log = checkpoints.sample_ids_log(self.out_dir, dist.rank)
        if config.train.record_sample_ids:
            self.ids_log.parent.mkdir(parents=True, exist_ok=True)
            checkpoints.truncate_jsonl(self.ids_log, start_step)
            if dist.is_main:
                # Ranks of a larger run this one resumes (with fewer processes) log no more.
                for other in sorted(self.ids_log.parent.glob("rank-*.jsonl")):
                    if int(other.stem.removeprefix("rank-")) >= dist.world_size:
                        checkpoints.truncate_jsonl(other, start_step)
        return continued_from

    def _data_stream(self, split: SplitShards, state: dict[str, Any] | None, trainer: Trainer) -> tuple[BatchPlan, Any]:
        """The global plan and this rank's micro-batches, from the checkpoint's data state (a JSON
        object in trainer_state.json, the same for every rank) or the start."""
        from lumo_core.lm.data import BatchPlan, TrainStream, make_loader

        config, dist = self.config, self.dist
        plan = BatchPlan.from_config(config, split, self.token_space.special_id("<|pad_mm|>"), dist.world_size)
        self.data_state = state["data"] if state else None
        stream = TrainStream(plan, dist.rank, config.data.num_workers, self.data_state)
        loader = make_loader(stream, config.data.num_workers, pin_memory=trainer.device.type == "cuda")
        return plan, iter(loader)

    def _train_step(self, step: int, trainer: Trainer, batches: Any, interval: _Interval) -> tuple[Any, float]:
        """One optimizer step over `grad_accum_steps` micro-batches; returns the gradient norm
        and the step's tokens over all ranks."""
        import torch

        dist, device, accum = self.dist, trainer.device, self.config.optim.grad_accum_steps
        micro_batches: list[MicroBatch] = [next(batches) for _ in range(accum)]
        local = [
            sum(mb.n_target_tokens for mb in micro_batches),
            sum(mb.n_real_tokens for mb in micro_batches),
            sum(mb.n_pad_tokens for mb in micro_batches),
        ]
        global_targets, global_tokens, global_pad = dist.sum(local, device)
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        for index, mb in enumerate(micro_batches):
            syncing = dist.world_size == 1 or index == accum - 1
            with nullcontext() if syncing else trainer.no_sync():
                with trainer.autocast():
                    logits = trainer.wrapped(**mb.model_inputs(device), use_cache=False).logits
                loss_sum = token_loss_sum(logits, mb.labels.to(device, non_blocking=True), trainer.head_index)
                # DDP and FSDP average gradients over ranks; scaling by world size makes it a sum.
                (loss_sum * dist.world_size / max(global_targets, 1.0)).backward()
            step_loss += loss_sum.detach().double()
            self.data_state = mb.data_state
        grad_norm = torch.nn.utils.clip_grad_norm_(trainer.params, self.config.optim.grad_clip)
        trainer.optimizer.step()
        trainer.scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.rank_state["tokens"] += local[1]
        trainer.rank_state["pad_tokens"] += local[2]
        interval.targets += global_targets
        interval.tokens += global_tokens
        interval.pad += global_pad
        interval.loss += float(step_loss)
        if self.config.train.record_sample_ids:
            with open(self.ids_log, "a") as handle:
                handle.writelines(sample_ids_line(step, mb) for mb in micro_batches)
        return grad_norm, global_tokens

    def _log_step(
        self, step: int, trainer: Trainer, plan: BatchPlan, interval: _Interval, grad_norm: Any, started: float
    ) -> dict[str, Any]:
        """A train_log.jsonl line for the steps since the last one (and a progress line)."""
        max_steps = self.config.train.max_steps
        (loss_total,) = self.dist.sum([interval.loss], trainer.device)
        now = time.perf_counter()
        entry = {
            "step": step,
            "loss": loss_total / max(interval.targets, 1.0),
            "lr": trainer.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "stage": plan.stage_at(step - 1).name,
            "tokens": interval.tokens,
            "tokens_per_s": interval.tokens / max(now - interval.started, 1e-9),
            "padding_share": interval.pad / max(interval.pad + interval.tokens, 1.0),
            "elapsed_s": now - started,
        }
        if self.dist.is_main:
            with open(self.out_dir / TRAIN_LOG, "a") as handle:
                handle.write(json.dumps(entry, sort_keys=True) + "\n")
            if now - self._last_stderr >= self.reporter.progress_interval_s or step == max_steps:
                self._last_stderr = now
                self.reporter.log(
                    f"step {step}/{max_steps} loss {entry['loss']:.4f} lr {entry['lr']:.2e} "
                    f"{entry['tokens_per_s']:.0f} tokens/s padding {entry['padding_share']:.1%} ({entry['stage']})"
                )
        return entry

    def _maybe_checkpoint(self, step: int, trainer: Trainer) -> None:
        """checkpoint-<step>/ every `save_every` steps and at the last step."""
        train = self.config.train
        if not ((train.save_every and step % train.save_every == 0) or step == train.max_steps):
            return
        run_state = {
            "max_steps": train.max_steps,
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
            model=trainer.model,
            model_state=fsdp.full_model_state(trainer.model),
            optimizer_state=fsdp.full_optimizer_state(trainer.model, trainer.optimizer),
            scheduler_state=trainer.scheduler.state_dict(),
            rank_state=trainer.rank_state,
            token_space=self.token_space,
            run_state=run_state,
            dist=self.dist,
            keep=train.keep_checkpoints,
        )

    def _finish(
        self,
        trainer: Trainer,
        start_step: int,
        continued_from: int | None,
        session_tokens: float,
        started: float,
        last_entry: dict[str, Any],
        counts: dict[str, int],
    ) -> dict[str, Any]:
        """The run's summary, written with the final model into final/."""
        config, dist, rank_state = self.config, self.dist, trainer.rank_state
        train_seconds = time.perf_counter() - started
        if not last_entry and (self.out_dir / TRAIN_LOG).is_file():
            # Resumed at the last step (the final model was not written yet): nothing was logged now.
            last_entry = json.loads((self.out_dir / TRAIN_LOG).read_text().splitlines()[-1])
        rank_digests = dist.gather(fsdp.trainable_digest(trainer.model))
        # The plan is global: its count is every rank's.
        overlong = Counter(self.data_state["skipped_overlong"] if self.data_state else {})
        if overlong:
            self._log(
                f"samples longer than block_size {config.data.block_size} were passed over (each time met): {dict(sorted(overlong.items()))}"
            )
        tokens_all, pad_all = dist.sum([rank_state["tokens"], rank_state["pad_tokens"]], trainer.device)
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
            "device": str(trainer.device),
            "vocab_size": self.token_space.vocab_size_total,
            "token_space_sha256": self.token_space.sha256,
            "rank_weights_sha256": rank_digests,
            "weights_in_sync": len(set(rank_digests)) == 1,
            "checkpoint": str(self.out_dir / FINAL),
            "reused": False,
        }
        model, state = trainer.model, fsdp.full_model_state(trainer.model)
        if dist.is_main:
            if state is not None and config.finetune.method == "lora":
                # A sharded model's adapters cannot be merged in place: merge them into a copy.
                model, state = unsharded_copy(config, self.token_space, self.out_dir, state), None
            checkpoints.save_final(self.out_dir, model, self.token_space, summary, state)
        dist.barrier()
        return summary


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
        out_dir = settings.layout.lm_checkpoint
        with dist.exclusive(checkpoints.lock_path(out_dir), "`lumo train`"):
            summary = TrainingRun(config, token_space, shards_dir, out_dir, reporter, dist, init_from, new_run).run()
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
