"""Media decoding in guarded worker processes: one file's fault never stops a run.

Decoders (Pillow, libsndfile, scipy) run native code on bytes anyone may have written. A file
can make one raise anything, loop forever, or take its process down (a native crash, an OOM
kill). `GuardedPool` runs a task per item in spawned worker processes, one item at a time per
worker, and returns results in input order. A worker that runs past the timeout on one item is
killed with SIGKILL; a worker that dies while it works is noticed through its process sentinel.
Either way the item's result is what `fault(item, code, detail)` makes of it (a reject with
`decoder_timeout` or `decoder_crashed`), and a fresh worker takes the dead one's place.

The deadline counts from the moment an item is sent to a worker that has finished starting
(imports, initializer), so a slow start is never blamed on a file. A worker's address space may
be capped (`memory_limit_bytes`, RLIMIT_AS): once it has started, it may map that many bytes more
than it then holds, and a decoder that asks for more gets a MemoryError, which the task turns into
its item's reject. Counting from the started worker keeps the setting independent of the machine:
the libraries' own reservations (a BLAS thread pool sized by the core count) are not a file's.

Testing hook: with the environment variable LUMO_TESTING_DECODER_FAULTS=1 (and only then), a
worker given a media file whose bytes start with `LUMO-TEST-HANG` sleeps forever, and one whose
bytes start with `LUMO-TEST-SIGKILL` sends itself SIGKILL: real faults in a real worker, for
the tests of this module's recovery. A file whose first line is `LUMO-TEST-SWAP` and whose second
names a folder makes the worker replace the file's own folder with a symlink to that folder, just
before the file is opened: the race between the manifest's path check and the open, won on
purpose. Without the variable such a file is just unreadable media.
"""

from __future__ import annotations

import os
import resource
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from typing import Any, Self

from lumo_core.errors import DecoderFailedError, LumoError

FAULTS_ENV = "LUMO_TESTING_DECODER_FAULTS"
HANG_MAGIC = b"LUMO-TEST-HANG"
SIGKILL_MAGIC = b"LUMO-TEST-SIGKILL"
SWAP_MAGIC = b"LUMO-TEST-SWAP\n"
# A worker that dies this many times in a row before it is ready is a broken setup (an
# initializer that fails), not a bad file: the run stops and says so.
MAX_FAILED_STARTS = 3


def inject_testing_fault(path: str | os.PathLike) -> None:
    """The testing hook (see the module doc): a no-op unless LUMO_TESTING_DECODER_FAULTS=1."""
    if os.environ.get(FAULTS_ENV) != "1":
        return
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return
    if head.startswith(SWAP_MAGIC):
        folder = os.path.dirname(os.path.abspath(path))
        os.rename(folder, folder + ".before-swap")
        os.symlink(head[len(SWAP_MAGIC) :].decode().strip(), folder)
    if head.startswith(HANG_MAGIC):
        while True:
            time.sleep(3600)
    if head.startswith(SIGKILL_MAGIC):
        os.kill(os.getpid(), signal.SIGKILL)


def out_of_memory(path: object, limit_bytes: int | None) -> DecoderFailedError:
    """The error of a decode that ran out of its worker's address space."""
    return DecoderFailedError(
        path, f"out of memory: decoding needs more than limits.decoder_memory_bytes ({limit_bytes})"
    )


def _limit_address_space(extra_bytes: int) -> None:
    """RLIMIT_AS at what this process maps now plus `extra_bytes` (Linux: /proc; elsewhere the
    kernel does not enforce RLIMIT_AS, and nothing is set)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            size_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        return
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    limit = size_kb * 1024 + extra_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _serve(
    conn: Connection,
    initializer: Callable[..., None],
    initargs: tuple,
    task: Callable[[Any], Any],
    memory_limit_bytes: int | None = None,
) -> None:
    """A worker's life: start, say ready, then one item at a time until told to stop (None) or
    the parent is gone (EOF)."""

    # The parent decides when a run stops. Ctrl-C and a SIGTERM to the whole process group reach
    # the workers too: were a worker to die of them first, the parent would record its row as
    # `decoder_crashed` before stopping itself. The parent kills its workers as it stops, and a
    # worker whose parent is gone leaves at its next read (EOF).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    initializer(*initargs)
    if memory_limit_bytes is not None:
        _limit_address_space(memory_limit_bytes)
    conn.send(("ready", None, None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        index, item = message
        try:
            outcome = ("ok", index, task(item))
        except Exception as exc:  # noqa: BLE001 - reported to the parent as this item's fault
            outcome = ("raised", index, f"{type(exc).__name__}: {exc}")
        try:
            conn.send(outcome)
        except Exception as exc:  # noqa: BLE001 - a result that cannot be sent is this item's fault
            conn.send(("raised", index, f"result could not be sent ({type(exc).__name__}: {exc})"))


class _Worker:
    def __init__(
        self,
        context: Any,
        initializer: Callable[..., None],
        initargs: tuple,
        task: Callable[[Any], Any],
        memory_limit_bytes: int | None = None,
    ) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_serve, args=(child, initializer, initargs, task, memory_limit_bytes), daemon=True
        )
        self.process.start()
        child.close()
        self.ready = False
        self.job: tuple[int, Any] | None = None
        self.deadline = float("inf")

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()

    def stop(self) -> None:
        """Ask an idle worker to leave, and make sure it has."""
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(timeout=2)
        self.kill()


def death_detail(process: Any) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class GuardedPool:
    """`workers` spawned processes running `task` on one item each at a time, in input order,
    with at most `window` items taken from the input ahead of the one yielded next."""

    def __init__(
        self,
        workers: int,
        task: Callable[[Any], Any],
        initializer: Callable[..., None],
        initargs: tuple,
        timeout_s: float,
        fault: Callable[[Any, str, str], Any],
        memory_limit_bytes: int | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("a GuardedPool needs at least one worker")
        # spawn, not fork: the parent holds torch thread pools that a forked child would inherit.
        self._context = get_context("spawn")
        self._task, self._initializer, self._initargs = task, initializer, initargs
        self.timeout_s = timeout_s
        self.memory_limit_bytes = memory_limit_bytes
        self._fault = fault
        self._workers = [self._start() for _ in range(workers)]
        self._failed_starts = 0
        # What the run met: faults by code, and workers started to replace dead ones.
        self.faults: dict[str, int] = {}
        self.replaced = 0

    def _start(self) -> _Worker:
        return _Worker(self._context, self._initializer, self._initargs, self._task, self.memory_limit_bytes)

    def imap(
        self, items: Iterable[Any], window: int, passthrough: Callable[[Any], bool] = lambda item: False
    ) -> Iterator[Any]:
        """Results in input order; items for which `passthrough` is true come back as they are."""
        source = iter(items)
        results: dict[int, Any] = {}
        waiting: deque[tuple[int, Any]] = deque()
        taken = yielded = 0
        exhausted = False
        while True:
            while not exhausted and taken - yielded < window:
                item = next(source, _END)
                if item is _END:
                    exhausted = True
                elif passthrough(item):
                    results[taken] = item
                    taken += 1
                else:
                    waiting.append((taken, item))
                    taken += 1
            while yielded in results:
                yield results.pop(yielded)
                yielded += 1
                if not exhausted and taken - yielded < window:
                    break
            else:
                if exhausted and yielded == taken:
                    return
                self._dispatch(waiting)
                self._wait(results)

    def _dispatch(self, waiting: deque[tuple[int, Any]]) -> None:
        for worker in self._workers:
            if not waiting:
                return
            if worker.ready and worker.job is None:
                worker.job = waiting.popleft()
                worker.deadline = time.monotonic() + self.timeout_s
                try:
                    worker.conn.send(worker.job)
                except OSError:
                    pass  # the worker died; its sentinel says so in _wait

    def _wait(self, results: dict[int, Any]) -> None:
        busy = [w for w in self._workers if w.job is not None]
        next_deadline = min((w.deadline for w in busy), default=float("inf"))
        timeout = None if next_deadline == float("inf") else max(0.0, next_deadline - time.monotonic())
        handles = [w.conn for w in self._workers] + [w.process.sentinel for w in self._workers]
        wait(handles, timeout)
        for position, worker in enumerate(self._workers):
            self._workers[position] = self._check(worker, results)

    def _check(self, worker: _Worker, results: dict[int, Any]) -> _Worker:
        """Collect what `worker` sent; replace it when it died or ran out of time."""
        try:
            while worker.conn.poll():
                kind, index, payload = worker.conn.recv()
                if kind == "ready":
                    worker.ready = True
                    self._failed_starts = 0
                    continue
                item = worker.job[1]
                worker.job, worker.deadline = None, float("inf")
                results[index] = (
                    payload if kind == "ok" else self._record(item, "decoder_failed", f"the decoder raised {payload}")
                )
        except (EOFError, OSError):
            pass  # the pipe broke: the worker is dead, handled below
        if worker.process.is_alive() and time.monotonic() < worker.deadline:
            return worker
        if worker.process.is_alive():
            worker.kill()
            index, item = worker.job
            results[index] = self._record(
                item,
                "decoder_timeout",
                f"no result after {self.timeout_s:g} s (pipeline.decoder_timeout_s); the worker was killed",
            )
        else:
            worker.kill()
            if worker.job is not None:
                index, item = worker.job
                results[index] = self._record(
                    item, "decoder_crashed", f"the media worker died while decoding it ({death_detail(worker.process)})"
                )
            elif not worker.ready:
                self._failed_starts += 1
                if self._failed_starts >= MAX_FAILED_STARTS:
                    raise LumoError(
                        f"media worker processes die before they are ready ({death_detail(worker.process)}, "
                        f"{self._failed_starts} times in a row): the decoding setup is broken, not a file"
                    )
        self.replaced += 1
        return self._start()

    def _record(self, item: Any, code: str, detail: str) -> Any:
        self.faults[code] = self.faults.get(code, 0) + 1
        return self._fault(item, code, detail)

    def close(self, kill: bool = False) -> None:
        """Stop every worker: politely when idle, with SIGKILL when `kill` or when busy."""
        for worker in self._workers:
            if kill or worker.job is not None:
                worker.kill()
            else:
                worker.stop()
        self._workers = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.close(kill=exc_type is not None)


_END = object()
