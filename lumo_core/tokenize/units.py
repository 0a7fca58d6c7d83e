"""Work units: the manifest split by a hash of each row's id into a fixed number of units, each
tokenized on its own (a Dagster step, `lumo tokenize --unit K`, a worker process) into its own
spool; then one merge reads every unit's spool in key order as if it were one
(lumo_core.tokenize.spool.MergedSpool).

A row's unit depends on its id alone, never on the manifest order or the other rows. Shards are
cut from the merged key order, so they are the same bytes whatever the number of units, the order
the units ran in, or the machines they ran on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

UNIT_SALT = "lumo-unit-v1"


def unit_of(row_id: str, n_units: int) -> int:
    """The unit of a row id: the first 8 bytes of a salted sha256, modulo the unit count."""
    digest = hashlib.sha256(f"{UNIT_SALT}\0{row_id}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % n_units


def unit_of_line(row_id: str | None, line: int, n_units: int) -> int:
    """A manifest line's unit: by its id, or, for a line with no readable id, by its number (such
    a line is a reject whichever unit records it; each is recorded exactly once)."""
    return unit_of(row_id if row_id is not None else f"\0line:{line}", n_units)


def unit_spool_path(work_dir: Path, unit: int) -> Path:
    return work_dir / f"unit-{unit:05d}.sqlite"
