"""What a training output loses only by setting: runs set aside and earlier final models.

`lumo train --new-run` / `--init-from` set the previous run aside whole
(`lm_checkpoint-step<N>-<id>/`, recorded in `.lm_checkpoint.runs_aside.json` beside it), and a
continued run keeps its earlier final/ as `final-step<N>/`. Both are kept unless
`train.keep_runs_aside` / `train.keep_earlier_finals` say how many of the newest to keep; only
folders Lumo recorded or named so are ever deleted, each renamed aside first
(lumo_core.lm.durable).
"""

from __future__ import annotations

from pathlib import Path

from lumo_core.fileio import atomic_write_bytes, canonical_json_bytes
from lumo_core.lm.checkpoints import FINAL, runs_aside_file
from lumo_core.lm.durable import remove_dir
from lumo_core.lm.state_files import read_json


def prune_runs_aside(out_dir: Path, keep: int | None) -> list[Path]:
    """Delete the oldest runs set aside from `out_dir` beyond the newest `keep` (None: keep all).
    Only folders that `set_run_aside` recorded are ever deleted. Returns what was deleted."""
    register = runs_aside_file(out_dir)
    if keep is None or not register.is_file():
        return []
    entries = [e for e in read_json(register) if (out_dir.parent / e["name"]).is_dir()]
    entries.sort(key=lambda e: e["set_aside_ns"])
    doomed = entries[: max(len(entries) - keep, 0)]
    for entry in doomed:
        remove_dir(out_dir.parent / entry["name"])
    atomic_write_bytes(register, canonical_json_bytes(entries[len(doomed) :]))
    return [out_dir.parent / e["name"] for e in doomed]


def earlier_finals(out_dir: Path) -> list[Path]:
    """The final-step<N>/ folders, oldest (smallest N) first."""
    found = [p for p in out_dir.glob(f"{FINAL}-step*") if p.is_dir() and p.name[len(FINAL) + 5 :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(FINAL) + 5 :]))


def prune_earlier_finals(out_dir: Path, keep: int | None) -> list[Path]:
    """Delete the oldest final-step<N>/ folders beyond the newest `keep` (None: keep all)."""
    if keep is None:
        return []
    finals = earlier_finals(out_dir)
    doomed = finals[: max(len(finals) - keep, 0)]
    for folder in doomed:
        remove_dir(folder)
    return doomed
