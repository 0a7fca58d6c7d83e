"""What a check returns: passed or not, a one-line description, and metadata that explains a
failure (which shard, which id, expected vs found). Shared by every check of lumo_core."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

# How many failures a check lists in its metadata (the count is always exact).
MAX_LISTED = 20


@dataclass
class CheckOutcome:
    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)
    # "ERROR" or "WARN" when the outcome decides its own severity (reject_rate); None: the
    # registry's severity for the check.
    severity: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "description": self.description, "metadata": self.metadata}


def pick(keys: list[str], n: int, seed: int) -> list[str]:
    """A deterministic sample of keys: the n smallest salted hashes (independent of order)."""
    return sorted(keys, key=lambda k: hashlib.sha256(f"{seed}\0{k}".encode()).hexdigest())[:n]
