"""The checkpoint layout of a training run, and the state it resumes from.

Under lm_checkpoint/:
    checkpoint-<step>/   the model (save_pretrained, safetensors; LoRA: the adapter),
                         optimizer.{json,safetensors} (the full optimizer state, by parameter
                         name, whatever the number of ranks or the sharding), scheduler.{json,
                         safetensors}, trainer_state.json, token_space.json, and per rank
                         rank-<r>.{json,safetensors} (data stream position, RNG states)
    latest               name of the newest complete checkpoint (written after it is complete
                         and fsynced; it must name a checkpoint-<step> folder of this run)
    base/                LoRA only: the base model the adapters belong to
    final/               the trained model as a plain transformers model (LoRA merged in), with
                         token_space.json and training_summary.json
    final-step<N>/       an earlier final/, kept when its run was continued past step N
    train_log.jsonl      one line per logged step
    sample_ids/          per rank, the sample ids of every step (train.record_sample_ids)
Nothing in a checkpoint is unpickled: state is JSON plus safetensors (lumo_core.lm.state_files),
every file is checked before a resume reads it, and a file of any other kind is refused by name.
Every folder is written under a temporary name, fsynced and renamed when complete; `latest` is
replaced atomically after the checkpoint it names, and older checkpoints are pruned only after
that (lumo_core.lm.durable: rename aside, then delete). Nothing here deletes a user's checkpoint: pruning to
`keep` spares the last checkpoint of every finished run (its step equals the max_steps it was
trained to), leftovers are cleared only where no checkpoint exists, and a run set aside for a new
one is moved whole to a sibling folder of its own name. The training loop is lumo_core.lm.training;
torch is imported only when a checkpoint is written or read.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lumo_core.errors import LumoError
from lumo_core.fileio import atomic_write_bytes, canonical_json_bytes, fsync_path
from lumo_core.lm.durable import crash_point, fsync_tree, remove_dir, replace_dir
from lumo_core.lm.state_files import check_safetensors, load_state, read_json, save_state

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
# 2: state as JSON + safetensors (1 pickled the rank state, and is refused).
STATE_FORMAT_VERSION = 2
CHECKPOINT_NAME = re.compile(r"checkpoint-[0-9]+")
# Files a checkpoint may hold besides JSON and safetensors: peft's model card, never read.
UNREAD_FILES = {"README.md"}


# ------------------------------------------------------------------------------ layout
def checkpoint_dirs(out_dir: Path) -> list[Path]:
    found = [
        p for p in out_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint `latest` names, or None when there is none or it is incomplete. `latest`
    must hold the name of a checkpoint-<step> folder inside `out_dir`; anything else is refused."""
    pointer = out_dir / LATEST
    if not pointer.is_file():
        return None
    raw = pointer.read_bytes()
    name = raw.decode("ascii", errors="replace").strip()
    if not CHECKPOINT_NAME.fullmatch(name):
        raise LumoError(
            f"refused {pointer}: it must name a checkpoint-<step> folder of this run, it holds {raw[:60]!r}"
        )
    path = out_dir / name
    if path.is_symlink():
        raise LumoError(f"refused {pointer}: {path} is a symlink, not a checkpoint folder of this run")
    return path if (path / TRAINER_STATE).is_file() else None


def lock_path(out_dir: Path) -> Path:
    """The lock of one writer of a run folder, beside it (a run set aside moves without it)."""
    return out_dir.with_name(f".{out_dir.name}.lock")


def rank_stem(checkpoint: Path, rank: int) -> Path:
    """A rank's own part of a checkpoint (<stem>.json and <stem>.safetensors): its token counts
    and RNG states."""
    return checkpoint / f"rank-{rank:05d}"


def sample_ids_log(out_dir: Path, rank: int) -> Path:
    return out_dir / SAMPLE_IDS / f"rank-{rank:05d}.jsonl"


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop the lines a resumed run will write again."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and _step_of(line, path) <= last_step]
        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


def _step_of(line: str, path: Path) -> int:
    import json

    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        raise LumoError(f"{path}: a line is not a step record Lumo wrote: {line[:80]!r}") from None


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
    """Move the whole run folder to `target` (one rename: every byte kept), record it in the
    list of runs set aside beside `out_dir` (so a later prune knows it), and leave an empty
    `out_dir`."""
    os.replace(out_dir, target)
    fsync_path(out_dir.parent)
    register = runs_aside_file(out_dir)
    entries = read_json(register) if register.is_file() else []
    entries.append({"name": target.name, "set_aside_ns": time.time_ns()})
    atomic_write_bytes(register, canonical_json_bytes(entries))
    out_dir.mkdir(parents=True)


def runs_aside_file(out_dir: Path) -> Path:
    """The list of runs set aside from `out_dir` (name, when), beside it."""
    return out_dir.with_name(f".{out_dir.name}.runs_aside.json")


def keep_final(out_dir: Path, step: int) -> Path | None:
    """Rename final/ to final-step<step>/ before a continued run writes a new final/."""
    final = out_dir / FINAL
    if not final.is_dir():
        return None
    target = out_dir / f"{FINAL}-step{step}"
    replace_dir(final, target)
    return target


def is_run_end(checkpoint: Path) -> bool:
    """Whether a checkpoint is the last one of a finished run (never pruned)."""
    path = checkpoint / TRAINER_STATE
    if not path.is_file():
        return False
    state = read_json(path)
    return state.get("max_steps") is not None and state["step"] == state["max_steps"]


# ------------------------------------------------------------------------ resume state
def latest_state(out_dir: Path) -> tuple[Path | None, dict[str, Any] | None]:
    """The newest complete checkpoint and its trainer_state.json, or (None, None)."""
    checkpoint = latest_checkpoint(out_dir)
    state = read_json(checkpoint / TRAINER_STATE) if checkpoint else None
    return checkpoint, state


def final_summary(out_dir: Path) -> dict[str, Any] | None:
    """final/training_summary.json, or None when no final model was written."""
    path = out_dir / FINAL / SUMMARY
    return read_json(path) if path.is_file() else None


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


def verify_checkpoint(folder: Path) -> None:
    """Refuse a checkpoint (or base/) folder unless every file in it is JSON or safetensors that
    parses, naming the first file that is not. Nothing is unpickled, so a planted file is refused
    before any loader of transformers, peft or torch opens it."""
    for path in sorted(folder.iterdir()):
        if path.name in UNREAD_FILES and path.is_file():
            continue
        if path.is_symlink() or not path.is_file():
            raise LumoError(f"refused {path}: a checkpoint holds only plain JSON and safetensors files")
        if path.suffix == ".json":
            read_json(path)
        elif path.suffix == ".safetensors":
            check_safetensors(path)
        else:
            raise LumoError(
                f"refused {path}: a checkpoint holds only JSON and safetensors files"
                + (
                    " (an earlier Lumo pickled the rank state: start a new run from its weights with "
                    f"`lumo train --init-from {folder}`)"
                    if path.suffix == ".pt"
                    else ""
                )
            )
    state = read_json(folder / TRAINER_STATE) if (folder / TRAINER_STATE).is_file() else None
    if state is not None and state.get("format_version") != STATE_FORMAT_VERSION:
        raise LumoError(
            f"refused {folder / TRAINER_STATE}: state format {state.get('format_version')}, this Lumo reads "
            f"{STATE_FORMAT_VERSION}: start a new run from its weights with `lumo train --init-from {folder}`"
        )


def load_training_state(
    checkpoint: Path, rank: int, world_size: int, model: Any, optimizer: Any, scheduler: Any
) -> dict[str, Any]:
    """Load the optimizer (the full state, sharded as `model` is) and scheduler states, restore
    this rank's RNG states and return its rank state (token counts). The folder must have passed
    `verify_checkpoint`.

    The checkpoint may come from another number of processes (elastic resume; the data plan's
    position is global, in trainer_state.json). A rank the writing run did not have starts with no
    token counts and the RNG its build seeded (seed + rank); when fewer ranks resume, rank 0 takes
    over the counts of the ranks that are gone, so the run's totals stay whole."""
    from lumo_core.lm.fsdp import load_optimizer_state

    load_optimizer_state(model, optimizer, load_state(checkpoint / "optimizer"))
    scheduler.load_state_dict(load_state(checkpoint / "scheduler"))
    written = written_ranks(checkpoint)
    if rank >= written:
        return {"tokens": 0, "pad_tokens": 0}
    rank_state = load_state(rank_stem(checkpoint, rank))
    set_rng_state(rank_state["rng"])
    if rank == 0:
        for gone in range(world_size, written):
            counts = load_state(rank_stem(checkpoint, gone))
            rank_state["tokens"] += counts["tokens"]
            rank_state["pad_tokens"] += counts["pad_tokens"]
    return rank_state


def written_ranks(checkpoint: Path) -> int:
    """How many processes wrote the checkpoint: its rank-<r> states, numbered from 0 without gaps."""
    count = 0
    while rank_stem(checkpoint, count).with_suffix(".json").is_file():
        count += 1
    return count


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
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation=attn_implementation, use_safetensors=True
        )
    else:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(
            path.parent / BASE, dtype=torch.float32, attn_implementation=attn_implementation, use_safetensors=True
        )
        # peft reads adapter_model.safetensors when it is there, which weights_files() required.
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
def save_pretrained(model: Any, directory: Path, state_dict: dict[str, Any] | None = None) -> None:
    """`model` as a Hugging Face folder (safetensors); `state_dict`: the full weights gathered
    from a sharded model, saved with its config."""
    model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)


def save_base(out_dir: Path, model: Any) -> None:
    """Write base/ (LoRA: the model the adapters belong to). Rank 0 only."""
    tmp = out_dir / f".{BASE}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp)
    fsync_tree(tmp)
    replace_dir(tmp, out_dir / BASE)


def save_checkpoint(
    out_dir: Path,
    step: int,
    *,
    model: Any,
    model_state: dict[str, Any] | None,
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    rank_state: dict[str, Any],
    token_space: TokenSpace,
    run_state: dict[str, Any],
    dist: Distributed,
    keep: int,
) -> None:
    """Write checkpoint-<step>/ and point `latest` at it, keeping the newest `keep` checkpoints
    and the last checkpoint of every finished run.

    Every rank calls this: rank 0 writes the shared files (`model_state` and `optimizer_state`
    are the full states, gathered on rank 0 when the model is sharded; None: `model`'s own),
    each rank its own rank-<r> files. `run_state` is what trainer_state.json records besides the
    format version and the step. The folder is fsynced before `latest` moves, and `latest`
    before anything older is pruned."""
    name = f"{CHECKPOINT_PREFIX}{step}"
    tmp = out_dir / f".{name}.tmp"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    if dist.is_main:
        save_pretrained(model, tmp, model_state)
        save_state(tmp / "optimizer", optimizer_state)
        save_state(tmp / "scheduler", scheduler_state)
        (tmp / "token_space.json").write_bytes(token_space.to_json_bytes())
        trainer_state = {"format_version": STATE_FORMAT_VERSION, "step": step, **run_state}
        (tmp / TRAINER_STATE).write_bytes(canonical_json_bytes(trainer_state))
    for path in save_state(rank_stem(tmp, dist.rank), {**rank_state, "rng": rng_state()}):
        fsync_path(path)
    crash_point("checkpoint-written")
    dist.barrier()
    if dist.is_main:
        fsync_tree(tmp)
        crash_point("checkpoint-synced")
        replace_dir(tmp, out_dir / name)
        crash_point("checkpoint-renamed")
        atomic_write_bytes(out_dir / LATEST, (name + "\n").encode())
        crash_point("latest-moved")
        for old in checkpoint_dirs(out_dir)[:-keep]:
            if not is_run_end(old):
                remove_dir(old)
                crash_point("pruned-one")
    dist.barrier()


def save_final(
    out_dir: Path,
    model: Any,
    token_space: TokenSpace,
    summary: dict[str, Any],
    state_dict: dict[str, Any] | None = None,
) -> None:
    """Write final/: the model as a plain transformers model (LoRA merged in; `state_dict`: the
    full weights of a sharded model). Rank 0 only. The old final/ is renamed aside, never
    deleted before the new one has its name."""
    from lumo_core.lm.model import full_model

    tmp = out_dir / f".{FINAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(full_model(model) if state_dict is None else model, tmp, state_dict)
    (tmp / "token_space.json").write_bytes(token_space.to_json_bytes())
    (tmp / SUMMARY).write_bytes(canonical_json_bytes(summary))
    fsync_tree(tmp)
    crash_point("final-synced")
    replace_dir(tmp, out_dir / FINAL)
