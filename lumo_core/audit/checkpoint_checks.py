"""Checks of the trained checkpoint, read from its files (no torch needed)."""

from __future__ import annotations

import json

from lumo_core.audit.outcome import CheckOutcome
from lumo_core.config import Settings
from lumo_core.errors import MissingUpstreamError, rebuild_hint
from lumo_core.lm.checkpoints import FINAL
from lumo_core.lm.model import TOKEN_SPACE_ATTR
from lumo_core.uti.token_space import TokenSpace


def check_vocab_matches_token_space(settings: Settings) -> CheckOutcome:
    """The checkpoint's config.json (vocab_size and the token space it was trained for) against
    token_space.json."""
    config_path = settings.layout.lm_checkpoint / FINAL / "config.json"
    if not config_path.is_file():
        raise MissingUpstreamError(
            f"{config_path} not found: train first: {rebuild_hint('lm_checkpoint', 'lumo train')}"
        )
    model_config = json.loads(config_path.read_bytes())
    vocab_size = model_config.get("text_config", model_config).get("vocab_size")
    trained_for = model_config.get(TOKEN_SPACE_ATTR)
    space = TokenSpace.read_output(settings.layout.token_space)
    problems = []
    if vocab_size != space.vocab_size_total:
        problems.append({"field": "vocab_size", "expected": space.vocab_size_total, "found": vocab_size})
    if trained_for != space.sha256:
        problems.append({"field": TOKEN_SPACE_ATTR, "expected": space.sha256, "found": trained_for})
    return CheckOutcome(
        passed=not problems,
        description=f"checkpoint vocab_size {vocab_size} vs token space vocab_size_total {space.vocab_size_total}",
        metadata={"checkpoint_config": str(config_path), "problems": problems, "token_space_sha256": space.sha256},
    )
