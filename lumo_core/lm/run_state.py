"""Which run an output folder holds, and where a new `lumo train` starts in it.

A run is identified by its recipe: the trajectory settings, the token space, the shards (or the
`data.jsonl` source) and the starting weights. `resume_point` decides, from the folder's `latest`
checkpoint, whether this run resumes it, refuses (naming the changed settings and the ways on),
sets the old run aside whole (`new_run`), or clears leftovers of a run that never completed a
checkpoint. Nothing here deletes a checkpoint. See lumo_core.lm.training for the loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lumo_core.errors import LumoError
from lumo_core.fileio import canonical_json_bytes, sha256_hex
from lumo_core.lm import checkpoints
from lumo_core.lm.checkpoints import FINAL
from lumo_core.lm.data import RESUME_MAY_CHANGE, check_global_batch, data_source_sha256
from lumo_core.lm.pruning import prune_runs_aside

if TYPE_CHECKING:
    from lumo_core.lm.distributed import Distributed
    from lumo_core.lm.train_config import LoopConfig, TrainConfig
    from lumo_core.reporting import Reporter
    from lumo_core.uti.token_space import TokenSpace


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


@dataclass
class ResumePoint:
    """Where a run starts: the checkpoint it resumes (None: a fresh run) and its trainer state,
    the folder an earlier run was set aside to, and the weights to start from (moved with it
    when they were inside the folder set aside)."""

    checkpoint: Path | None
    state: dict[str, Any] | None
    previous_run: Path | None
    init_from: Path | None


def resume_point(
    out_dir: Path,
    identity: str,
    recipe: dict[str, Any],
    train: LoopConfig,
    dist: Distributed,
    reporter: Reporter,
    new_run: bool,
    init_from: Path | None,
    global_batch: dict[str, int],
) -> ResumePoint:
    """The checkpoint to resume from. A run folder holding another run's checkpoints is set
    aside whole with `new_run`, and refused otherwise; only leftovers of a run that never
    completed a checkpoint are cleared; runs set aside beyond `train.keep_runs_aside` are pruned."""
    max_steps = train.max_steps
    checkpoint, state = checkpoints.latest_state(out_dir)
    held = checkpoints.holds_models(out_dir)
    # Every rank has read the folder before rank 0 may change it.
    dist.barrier()
    if state is not None and state["run_identity"] == identity:
        # The number of processes and workers may change; the global batch may not.
        check_global_batch(state.get("data"), global_batch, str(checkpoint))
        if state["step"] > max_steps:
            raise LumoError(
                f"{checkpoint} is at step {state['step']}, past train.max_steps {max_steps}: nothing was deleted; "
                f"set train.max_steps to {state['step']} or more to keep that run, or start a new run from one of its "
                f"checkpoints with `lumo train --init-from {out_dir}/checkpoint-<step>`"
            )
        return ResumePoint(checkpoint, state, None, init_from)
    if held and not new_run:
        if state is not None:
            found = f"a run at step {state['step']} whose settings differ from this run's: {changed_settings(state.get('recipe'), recipe)}"
        else:
            found = "checkpoints but no complete `latest` pointer, so they cannot be told to be this run's"
        dirs = checkpoints.checkpoint_dirs(out_dir)
        source = checkpoint or (dirs[-1] if dirs else out_dir / FINAL)
        raise LumoError(
            f"{out_dir} holds {found}. Nothing was deleted. "
            f"Ways on: go back to its settings to resume it (train.max_steps may grow, to continue it); "
            f"`lumo train --new-run` moves it whole to {checkpoints.kept_run_name(out_dir, state)} and starts this run; "
            f"`lumo train --init-from {source}` does the same and starts from those weights; or train into another --output-dir"
        )
    previous_run: Path | None = None
    if dist.is_main and out_dir.is_dir() and any(out_dir.iterdir()):
        if held:
            previous_run = checkpoints.kept_run_name(out_dir, state)
            checkpoints.set_run_aside(out_dir, previous_run)
            reporter.log(f"the previous run in {out_dir} is kept whole as {previous_run}; starting a new run")
            for pruned in prune_runs_aside(out_dir, train.keep_runs_aside):
                reporter.log(
                    f"deleted {pruned}, the oldest run set aside beyond train.keep_runs_aside {train.keep_runs_aside}"
                )
        else:
            reporter.log(
                f"clearing {out_dir}: it holds no complete checkpoint, only leftovers of a run that stopped before one"
            )
            checkpoints.clear_leftovers(out_dir)
    previous_run = dist.gather(previous_run)[0]
    if previous_run is not None and init_from is not None and init_from.is_relative_to(out_dir.resolve()):
        # The weights to start from were inside the folder just set aside.
        init_from = previous_run.resolve() / init_from.relative_to(out_dir.resolve())
    dist.barrier()
    return ResumePoint(None, None, previous_run, init_from)
