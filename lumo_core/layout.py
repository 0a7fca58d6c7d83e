"""The output layout under LUMO_OUTPUT_DIR: every step's folder and the file that commits it.

One place names them, so that the CLI, the audits, the model side and the Dagster layer agree on
where each step writes and what "built" means (the commit file exists). The layout is part of the
outside contract (docs/contract.md, "Outputs").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The file whose presence means a step's output is whole: each is written last, by rename.
TOKEN_SPACE_FILE = "token_space.json"
TOKEN_SPACE_SHA_FILE = "token_space.sha256"
INDEX_FILE = "index.json"
REPORT_FILE = "report.json"
# A training run is committed by its final weights (lumo_core.lm.checkpoints names the folder).
FINAL_WEIGHTS = "final/model.safetensors"


@dataclass(frozen=True)
class OutputLayout:
    """The step folders under one output root (`Settings.layout`)."""

    root: Path

    @property
    def token_space(self) -> Path:
        return self.root / "token_space"

    @property
    def manifest_audit(self) -> Path:
        return self.root / "manifest_audit"

    @property
    def tokenized_shards(self) -> Path:
        return self.root / "tokenized_shards"

    @property
    def tokenized_audit(self) -> Path:
        return self.root / "tokenized_audit"

    @property
    def uti_audit(self) -> Path:
        return self.root / "uti_audit"

    @property
    def lm_checkpoint(self) -> Path:
        return self.root / "lm_checkpoint"

    @property
    def lm_eval(self) -> Path:
        return self.root / "lm_eval"

    @property
    def generate(self) -> Path:
        """`lumo generate` outputs (not a Dagster asset)."""
        return self.root / "generate"

    @property
    def tokenized_jsonl(self) -> Path:
        """`lumo export-jsonl` outputs (not a Dagster asset)."""
        return self.root / "tokenized_jsonl"

    def step(self, name: str) -> Path:
        """The folder of a step named at run time (a Dagster asset name); unknown names are errors."""
        if name.startswith("_") or not isinstance(getattr(type(self), name, None), property):
            raise ValueError(f"no output step named {name!r}")
        return getattr(self, name)

    def commit_file(self, name: str) -> Path:
        """The file that commits a step's output."""
        commit = {"token_space": TOKEN_SPACE_FILE, "tokenized_shards": INDEX_FILE, "lm_checkpoint": FINAL_WEIGHTS}.get(
            name, REPORT_FILE
        )
        return self.step(name) / commit
