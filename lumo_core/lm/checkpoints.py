"""The checkpoint layout of a training run, and the state it resumes from.

Under lm_checkpoint/:
    checkpoint-<step>/   the model (save_pretrained, safetensors; LoRA: the adapter), optimizer.pt,
                         scheduler.pt, trainer_state.json, token_space.json, and per rank
                         rank-<r>.pt (data stream position, RNG states)
    latest               name of the newest complete checkpoint (written after it is complete)
    base/                LoRA only: the base model the adapters belong to
    final/               the trained model as a plain transformers model (LoRA merged in), with
                         token_space.json and training_summary.json
    final-step<N>/       an earlier final/, kept when its run was continued past step N
    train_log.jsonl      one line per logged step
    sample_ids/          per rank, the sample ids of every step (train.record_sample_ids)
Every folder is written under a temporary name and renamed when complete; `latest` is replaced
atomically after the checkpoint it names. Nothing here deletes a user's checkpoint: pruning to
`keep` spares the last checkpoint of every finished run (its step equals the max_steps it was
trained to), leftovers are cleared only where no checkpoint exists, and a run set aside for a new
one is moved whole to a sibling folder of its own name. The training loop is lumo_core.lm.training;
torch is imported only when a checkpoint is written or read.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lumo_core.errors import LumoError
from lumo_core.fileio import atomic_write_bytes, canonical_json_bytes

if TYPE_CHECKING:
    from lumo_core.lm.distributed import Distributed
    from lumo_core.uti.token_space import TokenSpace

CHECKPOINT_PREFIX = "checkpoint-"
LATEST = "latest"
FINAL = "final"
BASE = "base"
TRAIN_LOG = "train_log.jsonl"
TRAINER_STATE = "trainer_state.json"
SUMMARY = "training_summary.json"
SAMPLE_IDS = "sample_ids"
STATE_FORMAT_VERSION = 1


# ------------------------------------------------------------------------------ layout
def checkpoint_dirs(out_dir: Path) -> list[Path]:
    found = [
        p for p in out_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = out_dir / LATEST
    if not pointer.is_file():
        return None
    path = out_dir / pointer.read_text().strip()
    return path if (path / TRAINER_STATE).is_file() else None


def rank_file(checkpoint: Path, rank: int) -> Path:
    """A rank's own part of a checkpoint: its data stream position and RNG states."""
    return checkpoint / f"rank-{rank:05d}.pt"


def sample_ids_log(out_dir: Path, rank: int) -> Path:
    return out_dir / SAMPLE_IDS / f"rank-{rank:05d}.jsonl"


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop the lines a resumed run will write again."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


def holds_models(out_dir: Path) -> bool:
    """Whether `out_dir` holds a checkpoint or a final model (anything a user may want back)."""
    return bool(checkpoint_dirs(out_dir)) or any(p.is_dir() for p in out_dir.glob(f"{FINAL}*"))


def clear_leftovers(out_dir: Path) -> None:
    """Remove what a run that never completed a checkpoint leaves (log, sample ids, LoRA base,
    temporary folders). Refuses where a checkpoint or final model exists."""
    if holds_models(out_dir):
        raise LumoError(f"{out_dir} holds checkpoints: they are not leftovers")
    for path in [out_dir / BASE, out_dir / SAMPLE_IDS, *out_dir.glob(".*.tmp")]:
        shutil.rmtree(path, ignore_errors=True)
    for name in (LATEST, TRAIN_LOG):
        (out_dir / name).unlink(missing_ok=True)


def kept_run_name(out_dir: Path, state: dict[str, Any] | None) -> Path:
    """The sibling folder a run set aside goes to: `<out_dir>-step<N>-<identity>`, numbered on
    when taken."""
    label = f"step{state['step']}-{str(state['run_identity'])[:8]}" if state else "incomplete"
    candidate = out_dir.with_name(f"{out_dir.name}-{label}")
    number = 2
    while candidate.exists():
        candidate = out_dir.with_name(f"{out_dir.name}-{label}-{number}")
        number += 1
    return candidate


def set_run_aside(out_dir: Path, target: Path) -> None:
    """Move the whole run folder to `target` (one rename: every byte kept) and leave an empty
    `out_dir`."""
    os.replace(out_dir, target)
    out_dir.mkdir(parents=True)


def keep_final(out_dir: Path, step: int) -> Path | None:
    """Rename final/ to final-step<step>/ before a continued run writes a new final/."""
    final = out_dir / FINAL
    if not final.is_dir():
        return None
    target = out_dir / f"{FINAL}-step{step}"
    shutil.rmtree(target, ignore_errors=True)
    os.replace(final, target)
    return target


def is_run_end(checkpoint: Path) -> bool:
    """Whether a checkpoint is the last one of a finished run (never pruned)."""
    path = checkpoint / TRAINER_STATE
    if not path.is_file():
        return False
    state = json.loads(path.read_text())
    return state.get("max_steps") is not None and state["step"] == state["max_steps"]


# ------------------------------------------------------------------------ resume state
def latest_state(out_dir: Path) -> tuple[Path | None, dict[str, Any] | None]:
    """The newest complete checkpoint and its trainer_state.json, or (None, None)."""
    checkpoint = latest_checkpoint(out_dir)
    state = json.loads((checkpoint / TRAINER_STATE).read_text()) if checkpoint else None
    return checkpoint, state


def final_summary(out_dir: Path) -> dict[str, Any] | None:
    """final/training_summary.json, or None when no final model was written."""
    path = out_dir / FINAL / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else None


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np
    import torch

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_training_state(checkpoint: Path, rank: int, optimizer: Any, scheduler: Any, device: Any) -> dict[str, Any]:
    """Load the optimizer and scheduler states, restore this rank's RNG states and return its
    rank state (data stream position, token counts)."""
    import torch

    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    # Our own file: stream states hold numpy arrays, so it is not weights-only.
    rank_state = torch.load(rank_file(checkpoint, rank), weights_only=False)
    set_rng_state(rank_state["rng"])
    return rank_state


def weights_files(path: Path) -> list[Path]:
    """The weight files that decide a checkpoint's model: a model folder's safetensors, or a
    LoRA checkpoint's adapter plus the base/ beside it."""
    path = Path(path)
    if (path / "config.json").is_file():
        files = sorted(path.glob("*.safetensors"))
    elif (path / "adapter_model.safetensors").is_file():
        files = [path / "adapter_model.safetensors", *sorted((path.parent / BASE).glob("*.safetensors"))]
    else:
        raise LumoError(
            f"{path}: neither a model folder (config.json) nor a LoRA checkpoint (adapter_model.safetensors)"
        )
    if len(files) < (1 if (path / "config.json").is_file() else 2):
        raise LumoError(
            f"{path}: no safetensors weights found (a LoRA checkpoint needs {path.parent / BASE} beside it)"
        )
    return files


def weights_sha256(path: Path) -> str:
    """sha256 over a checkpoint's weight files (names and bytes, in order)."""
    import hashlib

    from lumo_core.fileio import file_sha256

    digest = hashlib.sha256()
    for file in weights_files(path):
        digest.update(f"{file.name}:{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def load_weights(path: Path, token_space: TokenSpace, attn_implementation: str = "sdpa") -> Any:
    """Any checkpoint's weights as a plain transformers model (fp32, CPU): a model folder
    (final/, a full fine-tuning checkpoint-<N>/, base/) or a LoRA checkpoint-<N>/ merged into the
    base/ beside it. The model must be trained for `token_space`."""
    import torch
    from transformers import AutoModelForCausalLM

    from lumo_core.errors import TokenSpaceError
    from lumo_core.lm.model import TOKEN_SPACE_ATTR

    path = Path(path)
    weights_files(path)
    if (path / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn_implementation)
    else:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(
            path.parent / BASE, dtype=torch.float32, attn_implementation=attn_implementation
        )
        model = PeftModel.from_pretrained(base, path).merge_and_unload()
    recorded = getattr(model.config, TOKEN_SPACE_ATTR, None)
    if recorded != token_space.sha256:
        raise TokenSpaceError(
            f"{path} was trained for token space {str(recorded)[:12]}, this run's is {token_space.sha256[:12]}"
        )
    return model


def load_adapters(model: Any, checkpoint: Path) -> None:
    """Put a LoRA checkpoint's adapter weights into `model` (a PeftModel)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))


# ------------------------------------------------------------------------------ saving
def save_pretrained(model: Any, directory: Path) -> None:
    model.save_pretrained(directory, safe_serialization=True)


def save_base(out_dir: Path, model: Any) -> None:
    """Write base/ (LoRA: the model the adapters belong to). Rank 0 only."""
    base_dir = out_dir / BASE
    tmp = out_dir / f".{BASE}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp)
    shutil.rmtree(base_dir, ignore_errors=True)
    os.replace(tmp, base_dir)


def save_checkpoint(
    out_dir: Path,
    step: int,
    *,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    rank_state: dict[str, Any],
    token_space: TokenSpace,
    run_state: dict[str, Any],
    dist: Distributed,
    keep: int,
) -> None:
    """Write checkpoint-<step>/ and point `latest` at it, keeping the newest `keep` checkpoints
    and the last checkpoint of every finished run.

    Every rank calls this: rank 0 writes the shared files, each rank its own rank-<r>.pt.
    `run_state` is what trainer_state.json records besides the format version and the step."""
    import torch

    name = f"{CHECKPOINT_PREFIX}{step}"
    tmp = out_dir / f".{name}.tmp"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    if dist.is_main:
        save_pretrained(model, tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "token_space.json").write_bytes(token_space.to_json_bytes())
        trainer_state = {"format_version": STATE_FORMAT_VERSION, "step": step, **run_state}
        (tmp / TRAINER_STATE).write_bytes(canonical_json_bytes(trainer_state))
    torch.save({**rank_state, "rng": rng_state()}, rank_file(tmp, dist.rank))
    dist.barrier()
    if dist.is_main:
        target = out_dir / name
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        atomic_write_bytes(out_dir / LATEST, (name + "\n").encode())
        for old in checkpoint_dirs(out_dir)[:-keep]:
            if not is_run_end(old):
                shutil.rmtree(old)
    dist.barrier()


def save_final(out_dir: Path, model: Any, token_space: TokenSpace, summary: dict[str, Any]) -> None:
    """Write final/: the model as a plain transformers model (LoRA merged in). Rank 0 only."""
    from lumo_core.lm.model import full_model

    tmp = out_dir / f".{FINAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(full_model(model), tmp)
    (tmp / "token_space.json").write_bytes(token_space.to_json_bytes())
    (tmp / SUMMARY).write_bytes(canonical_json_bytes(summary))
    target = out_dir / FINAL
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
