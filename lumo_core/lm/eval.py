"""Evaluation of the trained token LM, written to lm_eval/:

    report.json       loss and perplexity per task on the eval split, next-token accuracy per
                      modality of the target token (text, special, image, audio), the samples
    loss_curve.png    training loss per step, from lm_checkpoint/train_log.jsonl
    samples/          per task, answers sampled under the task's grammar (the same
                      `generate_sample` as `lumo generate`, lumo_core.lm.generate_run) and decoded
                      back through the UTI: .png for image spans, .wav for audio spans, .txt for
                      text spans; report.json records their ids per span and the sha256 of the
                      evaluated weights (`weights_sha256`)

Sample prompts are eval sequences cut before their target, keeping the target's opening marker
(`<|soi|>`, `<|soa|>`, `<|sot|>`) so the model answers in the task's modality.
"""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from lumo_core.config import TASKS, Settings
from lumo_core.errors import (
    LumoError,
    MissingUpstreamError,
    TokenSpaceError,
    rebuild_hint,
)
from lumo_core.fileio import canonical_json_bytes, exclusive_lock, sha256_hex
from lumo_core.lm.train_config import SamplingConfig, load_train_config
from lumo_core.reporting import Reporter, markdown
from lumo_core.uti.token_space import (
    MODALITIES,
    TokenSpace,
)

SPAN_OPENERS = ("<|soi|>", "<|soa|>", "<|sot|>")


def evaluate_lm(
    model: Any, split: Any, token_space: TokenSpace, batch_size: int, device: Any, max_samples: int | None = None
) -> dict[str, Any]:
    """Per-task loss and perplexity, and next-token accuracy per modality, on a split."""
    import torch
    import torch.nn.functional as F

    from lumo_core.lm.data import collate_padded, iter_split
    from lumo_core.lm.heads import model_head_index, restrict_to_target_heads
    from lumo_core.uti.sequences import IGNORE_INDEX

    pad_id = token_space.special_id("<|pad_mm|>")
    loss_sum = {t: 0.0 for t in TASKS}
    targets = {t: 0 for t in TASKS}
    samples = {t: 0 for t in TASKS}
    correct = {m: 0 for m in MODALITIES}
    counted = {m: 0 for m in MODALITIES}
    autocast = (
        (lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16))
        if torch.device(device).type == "cuda"
        else nullcontext
    )
    # A modality-heads model is scored with each target's own head (its softmax); None: shared head.
    heads = model_head_index(model)

    def run(batch: list[Any]) -> None:
        tensors = collate_padded(batch, pad_id, 8)
        with torch.no_grad(), autocast():
            logits = model(
                input_ids=tensors["input_ids"].to(device),
                attention_mask=tensors["attention_mask"].to(device),
                use_cache=False,
            ).logits
        logits = logits[:, :-1].float().cpu()
        labels = tensors["labels"][:, 1:]
        logits = restrict_to_target_heads(logits, labels, heads)
        losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        predicted = logits.argmax(dim=-1)
        for row, sample in enumerate(batch):
            keep = labels[row] != IGNORE_INDEX
            loss_sum[sample.task] += float(losses[row][keep].sum())
            targets[sample.task] += int(keep.sum())
            samples[sample.task] += 1
            truth = labels[row][keep].numpy()
            hits = predicted[row][keep].numpy() == truth
            modality = token_space.modality_of(truth)
            for code, name in enumerate(MODALITIES):
                chosen = modality == code
                correct[name] += int(hits[chosen].sum())
                counted[name] += int(chosen.sum())

    batch: list[Any] = []
    seen = 0
    for sample in iter_split(split):
        if max_samples is not None and seen >= max_samples:
            break
        batch.append(sample)
        seen += 1
        if len(batch) == batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    if seen == 0:
        raise LumoError(f"the {split.split} split holds no samples: nothing to evaluate")

    def entry(loss: float, count: int) -> dict[str, Any]:
        mean = loss / count if count else None
        return {"loss": mean, "perplexity": math.exp(mean) if mean is not None else None, "n_target_tokens": count}

    return {
        "n_samples": seen,
        "per_task": {t: {**entry(loss_sum[t], targets[t]), "n_samples": samples[t]} for t in TASKS},
        "overall": entry(sum(loss_sum.values()), sum(targets.values())),
        "next_token_accuracy": {
            m: {"accuracy": correct[m] / counted[m] if counted[m] else None, "n": counted[m]} for m in MODALITIES
        },
    }


def plot_loss_curve(train_log: Path, png: Path) -> bool:
    """Training loss per step as a PNG; False when there is no training log."""
    if not train_log.is_file():
        return False
    entries = [json.loads(line) for line in train_log.read_text().splitlines() if line.strip()]
    if not entries:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    axis.plot([e["step"] for e in entries], [e["loss"] for e in entries], marker="o", markersize=2, linewidth=1)
    axis.set_xlabel("step")
    axis.set_ylabel("training loss (nats / token)")
    axis.set_title("token LM training loss")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png, format="png", metadata={"Software": None})
    plt.close(figure)
    return True


def sample_prompt(input_ids: np.ndarray, labels: np.ndarray, token_space: TokenSpace) -> np.ndarray:
    """The conditioning part of a sequence, plus the target's opening marker when it has one."""
    from lumo_core.uti.sequences import IGNORE_INDEX

    supervised = np.flatnonzero(labels != IGNORE_INDEX)
    if supervised.size == 0:
        return np.asarray(input_ids)
    first = int(supervised[0])
    openers = {token_space.special_id(t) for t in SPAN_OPENERS if t in token_space.special_tokens}
    return np.asarray(input_ids[: first + 1] if int(input_ids[first]) in openers else input_ids[:first])


def write_samples(
    model: Any, token_space: TokenSpace, decoder: Any, split: Any, sampling: SamplingConfig, device: Any, out_dir: Path
) -> list[dict[str, Any]]:
    """Generate `samples_per_task` answers per task (lumo_core.lm.generate_run.generate_sample, as
    `lumo generate` does) to eval prompts, and decode their spans to files."""
    from lumo_core.lm.data import iter_split
    from lumo_core.lm.generate_run import generate_sample

    wanted = {t: sampling.samples_per_task for t in TASKS}
    records = []
    for sample in iter_split(split):
        if not any(wanted.values()):
            break
        if wanted[sample.task] == 0:
            continue
        index = sampling.samples_per_task - wanted[sample.task]
        wanted[sample.task] -= 1
        prompt = sample_prompt(sample.input_ids, sample.labels, token_space)
        record = generate_sample(
            model,
            token_space,
            decoder,
            sample.task,
            prompt,
            sampling,
            sampling.seed + len(records),
            device,
            out_dir,
            f"{sample.task}-{index}",
            text_files=True,
        )
        records.append({"id": sample.id, **record})
    return records


def _per_task_table(metrics: dict[str, Any]) -> str:
    lines = ["| task | samples | target tokens | loss | perplexity |", "|---|---:|---:|---:|---:|"]
    for task, row in metrics["per_task"].items():
        loss = f"{row['loss']:.4f}" if row["loss"] is not None else "-"
        ppl = f"{row['perplexity']:.2f}" if row["perplexity"] is not None else "-"
        lines.append(f"| {task} | {row['n_samples']} | {row['n_target_tokens']} | {loss} | {ppl} |")
    overall = metrics["overall"]
    lines.append(
        f"| **all** | {metrics['n_samples']} | {overall['n_target_tokens']} | {overall['loss']:.4f} | {overall['perplexity']:.2f} |"
    )
    return "\n".join(lines)


def run_eval(settings: Settings, reporter: Reporter, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate lm_checkpoint/final on the eval split; writes lm_eval/ (see module doc). One
    writer at a time: a second `lumo eval` on the same outputs is refused (LockHeldError)."""
    out_dir = settings.layout.lm_eval
    with exclusive_lock(out_dir.with_name(f".{out_dir.name}.lock"), "`lumo eval`"):
        return _evaluate(settings, reporter, overrides)


def _evaluate(settings: Settings, reporter: Reporter, overrides: dict[str, Any] | None) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    from lumo_core.lm.checkpoints import FINAL, TRAIN_LOG
    from lumo_core.lm.data import open_split
    from lumo_core.lm.distributed import resolve_device
    from lumo_core.lm.generate_run import load_decoder, weights_sha256
    from lumo_core.lm.model import TOKEN_SPACE_ATTR, load_lm
    from lumo_core.lm.training import train_inputs

    hf_logging.disable_progress_bar()
    config = load_train_config(settings.train_config, overrides)
    if config.train.torch_threads:
        import torch

        torch.set_num_threads(config.train.torch_threads)
    token_space, shards_dir = train_inputs(settings)
    checkpoint_dir = settings.layout.lm_checkpoint
    final = checkpoint_dir / FINAL
    if not (final / "config.json").is_file():
        raise MissingUpstreamError(f"{final} not found: train first: {rebuild_hint('lm_checkpoint', 'lumo train')}")
    device = resolve_device(config.train.device, 0)
    model = load_lm(final, device)
    trained_for = getattr(model.config, TOKEN_SPACE_ATTR, None)
    if trained_for != token_space.sha256:
        raise TokenSpaceError(
            f"{final} was trained for token space {str(trained_for)[:12]}, the outputs hold {token_space.sha256[:12]}: train again"
        )
    evaluated_weights = weights_sha256(final)
    split = open_split(shards_dir, "eval", token_space.sha256)
    reporter.log(f"evaluating {final} on {split.n_samples} eval samples")
    metrics = evaluate_lm(model, split, token_space, config.eval.micro_batch_size, device, config.eval.max_samples)

    out_dir = settings.layout.lm_eval
    work = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    has_curve = plot_loss_curve(checkpoint_dir / TRAIN_LOG, work / "loss_curve.png")
    samples: list[dict[str, Any]] = []
    if config.sampling.samples_per_task:
        decoder = load_decoder(settings, token_space)
        samples = write_samples(model, token_space, decoder, split, config.sampling, device, work / "samples")
        reporter.log(f"{len(samples)} samples generated, {sum(len(s['files']) for s in samples)} files decoded")
    report = {
        "checkpoint": str(final),
        "weights_sha256": evaluated_weights,
        "token_space_sha256": token_space.sha256,
        **metrics,
        "loss_curve": "loss_curve.png" if has_curve else None,
        "sampling": config.sampling.model_dump(mode="json"),
        "samples": samples,
    }
    payload = canonical_json_bytes(report)
    (work / "report.json").write_bytes(payload)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(work, out_dir)

    metadata: dict[str, Any] = {
        "report": str(out_dir / "report.json"),
        "overall_loss": metrics["overall"]["loss"],
        "overall_perplexity": metrics["overall"]["perplexity"],
        "weights_sha256": evaluated_weights,
        "per_task": markdown(_per_task_table(metrics)),
        "next_token_accuracy": {m: v["accuracy"] for m, v in metrics["next_token_accuracy"].items()},
        "samples": len(samples),
    }
    if has_curve:
        encoded = base64.b64encode((out_dir / "loss_curve.png").read_bytes()).decode("ascii")
        metadata["loss_curve"] = markdown(f"![loss](data:image/png;base64,{encoded})")
    reporter.report_materialization(metadata=metadata, data_version=sha256_hex(payload))
    return {
        "report": str(out_dir / "report.json"),
        **{
            k: report[k]
            for k in ("n_samples", "overall", "per_task", "next_token_accuracy", "loss_curve", "weights_sha256")
        },
        "samples": len(samples),
    }
