"""`make demo`, quietly: run a Dagster launch with its output in a log file, print one line per
finished step and check while it runs, then the result and where to look.

    python scripts/demo_summary.py --log .dagster/demo.log -- dg launch -m lumo_pipeline --assets '+tokenized_shards'

The launch's own output (Dagster's DEBUG event stream, the `lumo` processes' lines) goes to the
log file; the same events are in the run's page in the UI. The progress lines come from the run's
events in the instance (DAGSTER_HOME), read as the launch writes them; the result comes from the
output folder (LUMO_OUTPUT_DIR): tokenized_shards/index.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from dagster import DagsterEventType, DagsterInstance, EventLogRecord

from lumo_core.config import Settings

# The events a newcomer follows; everything else stays in the log.
FOLLOWED = {
    DagsterEventType.STEP_SUCCESS,
    DagsterEventType.STEP_FAILURE,
    DagsterEventType.STEP_UP_FOR_RETRY,
    DagsterEventType.STEP_SKIPPED,
    DagsterEventType.ASSET_CHECK_EVALUATION,
}
POLL_S = 1.0
# Lines of the log shown when the launch fails before its run begins.
TAIL_LINES = 15


def shown_path(path: Path) -> str:
    """The path relative to the current folder when it lies under it (shorter to read)."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def step_label(step_key: str) -> str:
    """`tokenized_shards.tokenize_unit[unit_00002]` -> `tokenized_shards: unit 2`."""
    asset, _, op = step_key.partition(".")
    if not op:
        return step_key
    if op.startswith("tokenize_unit[unit_"):
        return f"{asset}: unit {int(op.removeprefix('tokenize_unit[unit_').removesuffix(']'))}"
    return f"{asset}: {op.removesuffix('_units')}"


def progress_line(record: EventLogRecord, check_steps: set[str]) -> str | None:
    """One line for an event of FOLLOWED, or None (a check step's success: its check said it)."""
    event = record.event_log_entry.dagster_event
    if event is None:
        return None
    data = event.event_specific_data
    step = event.step_key or ""
    if event.event_type == DagsterEventType.ASSET_CHECK_EVALUATION:
        check_steps.add(step)
        verdict = "passed" if data.passed else ("FAILED" if data.severity.value == "ERROR" else "warned")
        name = f"check {data.asset_key.to_user_string()}:{data.check_name}"
        return f"  {verdict:7} {name:48} {data.description or ''}".rstrip()
    if event.event_type == DagsterEventType.STEP_SUCCESS:
        if step in check_steps:
            return None
        return f"  {'done':7} {step_label(step):48} {data.duration_ms / 1000:.1f} s"
    if event.event_type == DagsterEventType.STEP_SKIPPED:
        return f"  {'skipped':7} {step_label(step)}"
    error = getattr(data, "error", None)
    reason = error.message.strip().splitlines()[0] if error is not None else (event.message or "")
    verdict = "retry" if event.event_type == DagsterEventType.STEP_UP_FOR_RETRY else "FAILED"
    return f"  {verdict:7} {step_label(step):48} {reason}"


def latest_run_id(instance: DagsterInstance) -> str | None:
    runs = instance.get_runs(limit=1)
    return runs[0].run_id if runs else None


def follow(instance: DagsterInstance, process: subprocess.Popen[bytes]) -> str | None:
    """Print the progress of the run `process` launches until it exits; the run's id (None when
    it launched none)."""
    before = latest_run_id(instance)
    run_id: str | None = None
    cursor: str | None = None
    check_steps: set[str] = set()
    while True:
        exited = process.poll() is not None
        if run_id is None and (latest := latest_run_id(instance)) != before:
            run_id = latest
        if run_id is not None:
            while True:
                page = instance.get_records_for_run(run_id, cursor=cursor, of_type=FOLLOWED, limit=100)
                cursor = page.cursor
                for record in page.records:
                    line = progress_line(record, check_steps)
                    if line:
                        print(line, flush=True)
                if not page.has_more:
                    break
        if exited:
            return run_id
        time.sleep(POLL_S)


def result_lines(settings: Settings) -> list[str]:
    """What was built, read from the index the merge commits last."""
    index_file = settings.layout.commit_file("tokenized_shards")
    if not index_file.is_file():
        return []
    index = json.loads(index_file.read_text())
    splits = index["splits"]
    parts = [
        f"{split['n_samples']} {name} samples in {split['n_shards']} shard{'s' if split['n_shards'] != 1 else ''}"
        for name, split in sorted(splits.items(), key=lambda item: item[0] != "train")
    ]
    tokens = sum(split["n_tokens"] for split in splits.values())
    return [
        f"Result: {index['n_samples']} of {index['n_manifest_lines']} manifest lines tokenized, "
        f"{index['n_rejected']} rejected: {', '.join(parts)} ({tokens:,} tokens)."
    ]


def where_to_look(settings: Settings, log: Path, home: Path, dg: Path) -> list[str]:
    """The outputs this run left (those that exist), the full log and the UI (`dg dev`, with the
    `dg` of the launch: the virtual environment need not be active)."""
    layout = settings.layout
    outputs = [
        ("shards and their card", layout.tokenized_shards, "/ (README.md, index.json, train/, eval/)"),
        ("rejected rows", layout.tokenized_shards / "rejects.jsonl", ""),
        ("manifest audit", layout.commit_file("manifest_audit"), ""),
        ("token space", layout.commit_file("token_space"), ""),
    ]
    rows = [(name, shown_path(path) + note) for name, path, note in outputs if path.exists()]
    rows += [
        ("the run, in full", shown_path(log)),
        ("the UI", f"DAGSTER_HOME={shown_path(home)} {shown_path(dg)} dev   (then http://localhost:3000)"),
    ]
    return ["Where to look:", *(f"  {name:22} {where}" for name, where in rows)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", type=Path, required=True, help="file that receives the launch's own output")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the launch command, after `--`")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no launch command given (put it after `--`)")
    home = Path(os.environ["DAGSTER_HOME"])
    settings = Settings.from_env()
    args.log.parent.mkdir(parents=True, exist_ok=True)
    instance = DagsterInstance.get()
    print(f"Materializing through Dagster: {' '.join([Path(command[0]).name, *command[1:]])}", flush=True)
    print(f"  (Dagster's full log: {shown_path(args.log)})", flush=True)
    started = time.monotonic()
    with args.log.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            run_id = follow(instance, process)
        except KeyboardInterrupt:
            process.wait()
            raise
    seconds = time.monotonic() - started
    if process.returncode != 0:
        if run_id is None:
            # It failed before the run began (the code location did not load, say): its own words.
            print(*args.log.read_text(errors="replace").splitlines()[-TAIL_LINES:], sep="\n")
        print(f"Failed after {seconds:.0f} s (exit {process.returncode}); details in {shown_path(args.log)}")
        return process.returncode
    print(f"Done in {seconds:.0f} s (Dagster run {run_id}).")
    dg = Path(command[0]).with_name("dg")
    for line in [*result_lines(settings), *where_to_look(settings, args.log, home, dg)]:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
