"""This process's place in a torchrun launch (DDP), and the device it trains or evaluates on.

Used by the training run, by the checkpoint writer (barriers, which rank writes what) and by
evaluation and the training benchmark (the device). torch is imported only when it is needed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lumo_core.errors import LumoError


@dataclass
class Distributed:
    """This process's place in a torchrun launch (a single process when WORLD_SIZE is unset)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, device_setting: str) -> Distributed:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        import torch
        import torch.distributed as dist

        owns = False
        if not dist.is_initialized():
            uses_cuda = device_setting != "cpu" and torch.cuda.is_available()
            dist.init_process_group(backend="nccl" if uses_cuda else "gloo")
            owns = True
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def sum(self, values: list[float], device: Any) -> list[float]:
        if self.world_size == 1:
            return [float(v) for v in values]
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, value: Any) -> list[Any]:
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    @contextmanager
    def exclusive(self, lock_path: Path, purpose: str) -> Iterator[None]:
        """Rank 0 holds the named lock of an output (lumo_core.fileio.exclusive_lock) while the
        ranks write it; when another writer holds it, every rank raises its LockHeldError."""
        from lumo_core.errors import LockHeldError
        from lumo_core.fileio import exclusive_lock

        with ExitStack() as stack:
            refusal = None
            if self.is_main:
                try:
                    stack.enter_context(exclusive_lock(lock_path, purpose))
                except LockHeldError as exc:
                    refusal = str(exc)
            refusal = self.gather(refusal)[0]
            if refusal is not None:
                raise LockHeldError(refusal)
            yield

    def stop(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def resolve_device(setting: str, local_rank: int) -> Any:
    import torch

    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LumoError(f"train.device is {setting!r} but CUDA is not available here")
        return torch.device(setting if ":" in setting else f"cuda:{local_rank}")
    return torch.device("cpu")
