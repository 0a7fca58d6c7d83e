"""The shared head against modality-specific heads, on the same data, seed and steps.

    .venv/bin/python scripts/compare_heads.py [--workdir DIR] [--set key=value ...]

Builds the demo shards once (`lumo token-space`, `lumo tokenize`: the embedded sample and
tokenizers), then for each design runs `lumo train` and `lumo eval` through the CLI into its own
output folder, with `model.modality_heads` false or true and every other setting equal. The
checkpoints are scored on the eval split with lumo_core.lm.eval.evaluate_lm:
- the shared head over the `whole vocabulary`, as `lumo eval` scores it;
- both designs `per head`: each target's softmax over its own head's ids
  (lumo_core.lm.heads), the loss the heads model is trained with. For the shared head this
  is the same model renormalised, which separates what training with heads changes from what the
  narrower softmax alone gives. (A heads model's logits are never normalised across heads, so a
  whole-vocabulary score of it measures nothing.)
Prints a Markdown table, then one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

DESIGNS = {"shared head": False, "modality heads": True}


def lumo(output_dir: Path, *args: str) -> dict[str, Any]:
    env = {**os.environ, "LUMO_OUTPUT_DIR": str(output_dir)}
    result = subprocess.run(
        [sys.executable, "-m", "lumo_core.cli", *args], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"lumo {' '.join(args)} failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


class PerHeadScoring:
    """A model whose logits at each position keep only the ids of the next input id's head (the
    target's head, as evaluate_lm scores teacher-forced targets)."""

    def __init__(self, model: Any, token_space: Any) -> None:
        import torch

        from lumo_core.lm.heads import head_index, heads_for

        self.model = model
        self.config = model.config
        self.index = torch.from_numpy(head_index(heads_for(token_space), token_space.vocab_size_total))

    def __call__(self, input_ids: Any, **kwargs: Any) -> Any:
        import torch.nn.functional as F

        from lumo_core.lm.heads import restrict_to_target_heads
        from lumo_core.uti.sequences import IGNORE_INDEX

        output = self.model(input_ids=input_ids, **kwargs)
        targets = F.pad(input_ids[:, 1:], (0, 1), value=IGNORE_INDEX)
        output.logits = restrict_to_target_heads(output.logits, targets, self.index)
        return output


def score(output_dir: Path, per_head: bool) -> dict[str, Any]:
    from lumo_core.lm.data import open_split
    from lumo_core.lm.eval import evaluate_lm
    from lumo_core.lm.model import load_lm
    from lumo_core.uti.token_space import TokenSpace

    space = TokenSpace.read(output_dir / "token_space")
    model = load_lm(output_dir / "lm_checkpoint" / "final")
    split = open_split(output_dir / "tokenized_shards", "eval", space.sha256)
    return evaluate_lm(PerHeadScoring(model, space) if per_head else model, split, space, 8, "cpu")


def table(results: dict[str, dict[str, Any]]) -> str:
    tasks = ("t2i", "t2a", "i2t", "a2t")
    modalities = ("text", "special", "image", "audio")
    lines = [
        "| design | scored | "
        + " | ".join(f"{t} ppl" for t in tasks)
        + " | all ppl | "
        + " | ".join(f"{m} acc" for m in modalities)
        + " |",
        "|---|---|" + "---:|" * (len(tasks) + 1 + len(modalities)),
    ]
    for design, by_scoring in results.items():
        for scoring, metrics in by_scoring.items():
            ppl = [f"{metrics['per_task'][t]['perplexity']:.2f}" for t in tasks]
            acc = [f"{metrics['next_token_accuracy'][m]['accuracy']:.3f}" for m in modalities]
            lines.append(
                f"| {design} | {scoring} | "
                + " | ".join(ppl)
                + f" | {metrics['overall']['perplexity']:.2f} | "
                + " | ".join(acc)
                + " |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("outputs/compare_heads"))
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a training config override for both designs"
    )
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    data = args.workdir / "data"
    if not (data / "tokenized_shards" / "index.json").is_file():
        lumo(data, "token-space")
        lumo(data, "tokenize")
    sets = [flag for item in args.set for flag in ("--set", item)]
    results: dict[str, dict[str, Any]] = {}
    summaries: dict[str, Any] = {}
    for design, heads in DESIGNS.items():
        out = args.workdir / design.replace(" ", "_")
        shutil.rmtree(out, ignore_errors=True)
        for step in ("token_space", "tokenized_shards"):
            shutil.copytree(data / step, out / step)
        overrides = [*sets, "--set", f"model.modality_heads={str(heads).lower()}"]
        trained = lumo(out, "train", *overrides)
        evaluated = lumo(out, "eval", *overrides)
        summaries[design] = {
            "final_loss": trained["final_loss"],
            "steps": trained["steps"],
            "eval_samples": evaluated["n_samples"],
            "samples_generated": evaluated["samples"],
        }
        results[design] = {
            **({} if heads else {"whole vocabulary": score(out, per_head=False)}),
            "per head": score(out, per_head=True),
        }
    print(table(results))
    print(json.dumps({"summaries": summaries, "results": results}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
