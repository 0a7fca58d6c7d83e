"""`lumo bench train`: training throughput of our loop against the Hugging Face `Trainer`.

Both train the same model (the training config's, same init) on the same padded micro-batches
(drawn by our data stream as training goes, and handed to the HF Trainer row by row with no
shuffling, so both pay the same data cost), with the same batch size, optimiser, schedule and
clipping, in the same process. Throughput counts
non-padding input tokens per second, the median over the steps after `skip_steps` (the first
steps pay start-up costs). Each side runs `repeats` times, alternating, and keeps its best run. A last run of our
loop with packing gives the packed throughput and padding share.

Then the scale-out figures: `tokens_per_s_ddp` and `tokens_per_s_fsdp`, our loop as `lumo train`
under torchrun on 2 gloo processes (CPU, one thread each, `train.parallelism` ddp then fsdp, into
a scratch output folder), the same median; and the loader's `read_amplification` (bytes read
from shard files by 16 consumers over one epoch / the split's bytes) and `resume_s_start` /
`resume_s_end` (seconds from a data state to its first micro-batch, at the start and the end of
an epoch), measured by lumo_core.lm.read_measure.

Settings (`--set key=value`): steps, skip_steps, repeats, micro_batch_size, block_size, threads.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lumo_core.config import Settings
from lumo_core.errors import LumoError
from lumo_core.lm.train_config import TrainConfig, load_train_config
from lumo_core.reporting import Reporter

DEFAULTS = {"steps": 40, "skip_steps": 5, "repeats": 2, "micro_batch_size": None, "block_size": None, "threads": None}


def _settings(args: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(args) - set(DEFAULTS))
    if unknown:
        raise LumoError(f"bench train: unknown settings {unknown}; known: {sorted(DEFAULTS)}")
    merged = {**DEFAULTS, **args}
    for key in ("steps", "skip_steps", "repeats"):
        if not isinstance(merged[key], int) or merged[key] < 0:
            raise LumoError(f"bench train: {key} must be a non-negative integer, got {merged[key]!r}")
    if merged["steps"] <= merged["skip_steps"] or merged["repeats"] < 1:
        raise LumoError(f"bench train: need steps > skip_steps and repeats >= 1, got {merged}")
    return merged


def _config(settings: Settings, bench: dict[str, Any], packing: bool) -> TrainConfig:
    overrides: dict[str, Any] = {
        "train.max_steps": bench["steps"],
        "train.save_every": 0,
        "train.log_every": 1,
        "train.record_sample_ids": False,
        "data.packing": packing,
        "data.num_workers": 0,
        "optim.grad_accum_steps": 1,
        "finetune.method": "full",
    }
    for key, field in (
        ("micro_batch_size", "data.micro_batch_size"),
        ("block_size", "data.block_size"),
        ("threads", "train.torch_threads"),
    ):
        if bench[key] is not None:
            overrides[field] = bench[key]
    return load_train_config(settings.train_config, overrides)


def _rate(tokens: list[float], ends: list[float], skip: int) -> float:
    """Median over steps skip+1..N of each step's tokens per second (`ends[i]`: when step i
    ended, `ends[0]`: when training began). The median shrugs off the bursts in which other
    work on a shared machine steals the CPU."""
    rates = [tokens[i] / max(ends[i] - ends[i - 1], 1e-9) for i in range(skip + 1, len(ends))]
    return float(statistics.median(rates))


def _our_loop(config: TrainConfig, settings: Settings, reporter: Reporter, work: Path, skip: int) -> dict[str, Any]:
    from lumo_core.lm.checkpoints import TRAIN_LOG
    from lumo_core.lm.distributed import Distributed
    from lumo_core.lm.training import TrainingRun, train_inputs

    token_space, shards_dir = train_inputs(settings)
    summary = TrainingRun(config, token_space, shards_dir, work, reporter, Distributed()).run()
    log = [json.loads(line) for line in (work / TRAIN_LOG).read_text().splitlines()]
    return {
        "tokens_per_s": _rate([0.0] + [e["tokens"] for e in log], [0.0] + [e["elapsed_s"] for e in log], skip),
        "padding_share": summary["padding_share"],
        "mean_loss": sum(e["loss"] for e in log) / len(log),
    }


def _loader_figures(config: TrainConfig, settings: Settings) -> dict[str, float]:
    """read_amplification at 16 consumers, and resume seconds at an epoch's start and end."""
    try:
        from lumo_core.lm.plan import BatchPlan
        from lumo_core.lm.read_measure import measure_read_amplification, measure_resume_seconds
    except ImportError as exc:
        raise LumoError(
            f"bench train: the loader's figures need lumo_core.lm.read_measure and lumo_core.lm.plan "
            f"(the read-once loader), which this installation lacks ({exc})"
        ) from None
    from lumo_core.lm.data import open_train_split
    from lumo_core.lm.training import train_inputs

    token_space, shards_dir = train_inputs(settings)
    split = open_train_split(config, shards_dir, token_space.sha256)
    plan = BatchPlan.from_config(config, split, token_space.special_id("<|pad_mm|>"))
    resume = measure_resume_seconds(plan)
    return {
        "read_amplification": measure_read_amplification(plan),
        "resume_s_start": resume["resume_s_start"],
        "resume_s_end": resume["resume_s_end"],
    }


def _torchrun_loop(settings: Settings, bench: dict[str, Any], parallelism: str, work: Path, skip: int) -> float:
    """tokens/s of `lumo train` on 2 gloo processes (`parallelism`), in a scratch output folder
    that links the real token space and shards."""
    outputs = work / "outputs"
    outputs.mkdir(parents=True)
    for step in (settings.layout.token_space, settings.layout.tokenized_shards):
        (outputs / step.name).symlink_to(step.resolve(), target_is_directory=True)
    overrides = {
        "train.max_steps": bench["steps"],
        "train.save_every": 0,
        "train.log_every": 1,
        "train.device": "cpu",
        "train.torch_threads": 1,
        "train.parallelism": parallelism,
        "data.num_workers": 0,
        "finetune.method": "full",
        **({"data.micro_batch_size": bench["micro_batch_size"]} if bench["micro_batch_size"] else {}),
        **({"data.block_size": bench["block_size"]} if bench["block_size"] else {}),
    }
    env = {
        **os.environ,
        "LUMO_OUTPUT_DIR": str(outputs),
        "LUMO_MANIFEST": str(settings.manifest),
        "OMP_NUM_THREADS": "1",
    }
    if settings.train_config is not None:
        env["LUMO_TRAIN_CONFIG"] = str(settings.train_config)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "lumo_core.torchrun_train", *[f"--set={k}={v}" for k, v in overrides.items()]]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LumoError(f"bench train: {parallelism} on 2 gloo processes failed: {result.stderr.strip()[-1500:]}")
    log = [json.loads(line) for line in (outputs / "lm_checkpoint" / "train_log.jsonl").read_text().splitlines()]
    return _rate([0.0] + [e["tokens"] for e in log], [0.0] + [e["elapsed_s"] for e in log], skip)


def _hf_trainer(config: TrainConfig, settings: Settings, work: Path, skip: int) -> dict[str, Any]:
    import torch
    from torch.utils.data import IterableDataset
    from transformers import (
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    from lumo_core.lm.data import BatchPlan, iter_micro_batches, open_split
    from lumo_core.lm.distributed import resolve_device
    from lumo_core.lm.model import build_model
    from lumo_core.lm.training import train_inputs

    token_space, shards_dir = train_inputs(settings)
    split = open_split(shards_dir, "train", token_space.sha256)
    plan = BatchPlan.from_config(config, split, token_space.special_id("<|pad_mm|>"))
    tokens = [0.0]

    class Rows(IterableDataset):
        """Our stream's micro-batches, row by row, read as the Trainer asks for them (so both
        loops pay the same data cost)."""

        def __iter__(self):
            for batch in iter_micro_batches(plan):
                tokens.append(float(batch.n_real_tokens))
                for row in range(batch.input_ids.shape[0]):
                    yield {
                        "input_ids": batch.input_ids[row],
                        "labels": batch.labels[row],
                        "attention_mask": batch.attention_mask[row],
                    }

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    device = resolve_device(config.train.device, 0)
    if config.train.torch_threads:
        torch.set_num_threads(config.train.torch_threads)
    optim = config.optim
    arguments = TrainingArguments(
        output_dir=str(work),
        per_device_train_batch_size=config.data.micro_batch_size,
        gradient_accumulation_steps=1,
        max_steps=config.train.max_steps,
        learning_rate=optim.lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.betas[0],
        adam_beta2=optim.betas[1],
        adam_epsilon=optim.eps,
        warmup_steps=optim.warmup_steps,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": optim.min_lr_ratio},
        max_grad_norm=optim.grad_clip,
        optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch",
        bf16=device.type == "cuda",
        use_cpu=device.type == "cpu",
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=config.seed,
    )
    clock = StepClock()
    trainer = Trainer(
        model=build_model(config, token_space),
        args=arguments,
        train_dataset=Rows(),
        data_collator=default_data_collator,
        callbacks=[clock],
    )
    # Its end-of-run metrics line would land on stdout, where the report's JSON must be last.
    trainer.remove_callback(PrinterCallback)
    result = trainer.train()
    return {"tokens_per_s": _rate(tokens, clock.ends, skip), "mean_loss": float(result.training_loss)}


def run_bench_train(settings: Settings, reporter: Reporter, args: dict[str, Any]) -> dict[str, Any]:
    """Run the benchmark; returns the report (also printed by `lumo bench train`)."""
    import torch
    from transformers.utils import logging as hf_logging

    from lumo_core.lm.training import train_inputs

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    bench = _settings(args)
    train_inputs(settings)
    padded, packed = _config(settings, bench, packing=False), _config(settings, bench, packing=True)
    skip = bench["skip_steps"]
    loader = _loader_figures(packed, settings)
    ours, theirs = [], []
    with tempfile.TemporaryDirectory(prefix="lumo-bench-train-") as tmp:
        work = Path(tmp)
        for repeat in range(bench["repeats"]):
            reporter.log(
                f"round {repeat + 1}/{bench['repeats']}: HF Trainer, then our loop, {bench['steps']} steps each"
            )
            theirs.append(_hf_trainer(padded, settings, work / f"hf-{repeat}", skip))
            ours.append(_our_loop(padded, settings, reporter, work / f"ours-{repeat}", skip))
        with_packing = _our_loop(packed, settings, reporter, work / "packed", skip)
        reporter.log(f"lumo train on 2 gloo processes, ddp then fsdp, {bench['steps']} steps each")
        scale_out = {
            f"tokens_per_s_{mode}": _torchrun_loop(settings, bench, mode, work / f"torchrun-{mode}", skip)
            for mode in ("ddp", "fsdp")
        }
    best_ours = max(ours, key=lambda r: r["tokens_per_s"])
    best_theirs = max(theirs, key=lambda r: r["tokens_per_s"])
    report = {
        "tokens_per_s": best_ours["tokens_per_s"],
        "hf_trainer_tokens_per_s": best_theirs["tokens_per_s"],
        "speedup_vs_hf_trainer": best_ours["tokens_per_s"] / best_theirs["tokens_per_s"],
        "tokens_per_s_packed": with_packing["tokens_per_s"],
        **scale_out,
        **loader,
        "padding_share_padded": best_ours["padding_share"],
        "padding_share_packed": with_packing["padding_share"],
        # Mean training loss over the run: the two loops should learn alike on the same batches.
        "mean_loss_ours": best_ours["mean_loss"],
        "mean_loss_hf_trainer": best_theirs["mean_loss"],
        "runs_tokens_per_s": {
            "ours": [r["tokens_per_s"] for r in ours],
            "hf_trainer": [r["tokens_per_s"] for r in theirs],
        },
        "steps": bench["steps"],
        "timed_steps": bench["steps"] - skip,
        "micro_batch_size": padded.data.micro_batch_size,
        "block_size": padded.data.block_size,
        "model": padded.model.path
        or f"default {padded.model.default.architecture} (hidden {padded.model.default.hidden_size}, {padded.model.default.num_layers} layers)",
        "device": str(torch.device("cuda" if torch.cuda.is_available() and padded.train.device != "cpu" else "cpu")),
        "torch_threads": torch.get_num_threads(),
    }
    reporter.log(
        f"ours {report['tokens_per_s']:.0f} tokens/s, HF Trainer {report['hf_trainer_tokens_per_s']:.0f} tokens/s "
        f"({report['speedup_vs_hf_trainer']:.2f}x); padding {report['padding_share_padded']:.1%} padded, {report['padding_share_packed']:.1%} packed; "
        f"2 gloo processes: ddp {report['tokens_per_s_ddp']:.0f}, fsdp {report['tokens_per_s_fsdp']:.0f} tokens/s; "
        f"read amplification {report['read_amplification']:.2f}x, resume {report['resume_s_start']:.2f} s / {report['resume_s_end']:.2f} s"
    )
    return report
