"""Running a tokenizing run's model calls: how many at once, on how many threads, and their cost.

On CPU every call runs on ONE torch thread, and as many calls run side by side as the process
has threads for the models (`pipeline.torch_threads`, default: its cores). Threads across rows
instead of inside one call: on 2 cores that measured faster than two threads inside each call
(README, "Measured figures"), it keeps no core idle at an OpenMP barrier while the media
workers or other processes take a turn, and a call's result does not depend on how many cores
the machine has. On a GPU the calls run one at a time, at the configured fixed batch shape.

Either way the calls run in worker threads, so the thread that feeds them keeps receiving
decoded rows and building samples meanwhile.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from lumo_core.config import device_kind


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def calls_at_once(device: str, torch_threads: int | None) -> int:
    """Model calls that run side by side: on CPU one per thread for the models, on a GPU one."""
    if device_kind(device) != "cpu":
        return 1
    return torch_threads or usable_cores()


class ModelCalls:
    """A small pool of threads for model calls, with the busy time and the seconds per modality.

    `busy_s` is wall time during which at least one call ran (the models' share of a run);
    `call_s[modality]` sums each call's own duration (with calls side by side, more than the
    wall time). On CPU torch is set to one thread while the pool lives: `close()` puts the
    process's thread count back.
    """

    def __init__(self, device: str, torch_threads: int | None) -> None:
        self.calls_at_once = calls_at_once(device, torch_threads)
        self.one_thread_each = device_kind(device) == "cpu"
        self.busy_s = 0.0
        self.call_s: dict[str, float] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._saved_threads: int | None = None
        self._lock = threading.Lock()
        self._active = 0
        self._busy_since = 0.0

    def submit(self, modality: str, call: Callable[..., Any], *args: Any) -> Future:
        if self._pool is None:
            self._start()
        assert self._pool is not None
        return self._pool.submit(self._timed, modality, call, *args)

    def _start(self) -> None:
        # Only a process that loaded real models has torch; model-free (dummy) adapters need none.
        torch = sys.modules.get("torch")
        if self.one_thread_each and torch is not None:
            self._saved_threads = torch.get_num_threads()
            # Before the pool's threads exist: torch gives each new thread the count set here.
            torch.set_num_threads(1)
        self._pool = ThreadPoolExecutor(max_workers=self.calls_at_once, thread_name_prefix="lumo-model-call")

    def _timed(self, modality: str, call: Callable[..., Any], *args: Any) -> Any:
        started = time.perf_counter()
        with self._lock:
            if self._active == 0:
                self._busy_since = started
            self._active += 1
        try:
            return call(*args)
        finally:
            ended = time.perf_counter()
            with self._lock:
                self._active -= 1
                if self._active == 0:
                    self.busy_s += ended - self._busy_since
                self.call_s[modality] = self.call_s.get(modality, 0.0) + ended - started

    def close(self) -> None:
        """Wait for the calls in flight, stop the threads, give torch its thread count back."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._saved_threads is not None:
            sys.modules["torch"].set_num_threads(self._saved_threads)
            self._saved_threads = None
