"""The asset checks of docs/contract.md §7, in one registry: name, the asset it checks, severity,
whether it blocks downstream assets, whether it loads the models, and how to compute it.

`lumo check NAME` and the Dagster `@asset_check`s (lumo_pipeline.checks, built from this table in
a loop) read the same entries, so a check's asset, severity and blocking are decided here once.
Check logic lives in lumo_core.audit.shard_checks, tokenizer_checks and checkpoint_checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lumo_core.audit.checkpoint_checks import check_vocab_matches_token_space
from lumo_core.audit.outcome import CheckOutcome
from lumo_core.audit.shard_checks import (
    check_ids_in_range,
    check_reject_rate,
    check_rows_accounted,
    check_shards_match_index,
    check_splits_disjoint,
)
from lumo_core.audit.tokenizer_checks import (
    check_retokenize,
    check_runtime_sizes,
    check_tokenizers_deterministic,
)
from lumo_core.config import Settings, UTIConfig, load_uti_config
from lumo_core.reporting import Reporter
from lumo_core.tokenize.staging import committed_build
from lumo_core.uti.token_space import TokenSpace


@dataclass(frozen=True)
class CheckSpec:
    name: str
    asset: str
    description: str
    compute: Callable[[Settings, UTIConfig], CheckOutcome]
    severity: Literal["ERROR", "WARN"] = "ERROR"
    # A failed blocking check stops downstream assets in the same run.
    blocking: bool = False
    # Loads the tokenizers: runs where their weights (and the GPU) are, through the runner.
    needs_models: bool = False


def _shards(settings: Settings) -> Path:
    """The committed build, resolved once per check (lumo_core.tokenize.staging)."""
    return committed_build(settings.layout.tokenized_shards)


def _space(settings: Settings) -> TokenSpace:
    return TokenSpace.read_output(settings.layout.token_space)


CHECKS: dict[str, CheckSpec] = {
    spec.name: spec
    for spec in (
        CheckSpec(
            "runtime_size_match",
            "token_space",
            "Sizes recorded in token_space.json equal those of the loaded tokenizers.",
            lambda s, c: check_runtime_sizes(s.layout.token_space, c),
            needs_models=True,
        ),
        CheckSpec(
            "tokenizers_deterministic",
            "uti_audit",
            "Text, image and audio encode twice to equal ids.",
            lambda s, c: check_tokenizers_deterministic(s.layout.uti_audit),
        ),
        CheckSpec(
            "ids_in_range",
            "tokenized_shards",
            "Every span's ids lie inside its modality's range of the token space.",
            lambda s, c: check_ids_in_range(_shards(s), _space(s)),
            blocking=True,
        ),
        CheckSpec(
            "rows_accounted",
            "tokenized_shards",
            "Samples + rejects = manifest lines: no row vanished.",
            lambda s, c: check_rows_accounted(_shards(s)),
            blocking=True,
        ),
        CheckSpec(
            "splits_disjoint",
            "tokenized_shards",
            "No id is in both the train and the eval split.",
            lambda s, c: check_splits_disjoint(_shards(s)),
        ),
        CheckSpec(
            "shards_match_index",
            "tokenized_shards",
            "Every shard file's sha256 equals the one recorded in index.json.",
            lambda s, c: check_shards_match_index(_shards(s)),
            blocking=True,
        ),
        CheckSpec(
            "retokenize_matches",
            "tokenized_shards",
            "A sample of rows tokenized again gives the recorded token_sha256.",
            lambda s, c: check_retokenize(_shards(s), c, c.audit.retokenize_samples),
            blocking=True,
            needs_models=True,
        ),
        CheckSpec(
            "reject_rate",
            "tokenized_shards",
            "Share of rejected manifest lines: warns over audit.reject_rate_warn, fails (and blocks) over audit.reject_rate_fail or with 0 samples.",
            lambda s, c: check_reject_rate(_shards(s), c.audit.reject_rate_warn, c.audit.reject_rate_fail),
            severity="WARN",
            blocking=True,
        ),
        CheckSpec(
            "vocab_matches_token_space",
            "lm_checkpoint",
            "The checkpoint's vocab_size equals the token space's vocab_size_total.",
            lambda s, c: check_vocab_matches_token_space(s),
        ),
    )
}


def compute_check(name: str, settings: Settings) -> CheckOutcome:
    return CHECKS[name].compute(settings, load_uti_config(settings.uti_config))


def run_check(name: str, settings: Settings, reporter: Reporter) -> dict[str, Any]:
    """Compute one named check and report it (to Dagster when run through Pipes)."""
    spec = CHECKS[name]
    outcome = compute_check(name, settings)
    reporter.report_check(
        name,
        outcome.passed,
        {**outcome.metadata, "description": outcome.description},
        severity=outcome.severity or spec.severity,
        asset_key=spec.asset,
    )
    return {"check": name, "asset": spec.asset, **outcome.to_json()}
