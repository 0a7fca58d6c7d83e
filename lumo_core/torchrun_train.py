"""`torchrun --nproc-per-node N -m lumo_core.torchrun_train [--set key=value ...]`: `lumo train`
on every rank (DDP; the other `lumo train` flags work too).

Each process runs `lumo train` (lumo_core.cli.main): every rank trains, only rank 0 (RANK=0)
reports to Dagster Pipes and prints the JSON summary.
"""

from __future__ import annotations

import sys

from lumo_core.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
