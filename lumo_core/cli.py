"""The `lumo` command: the same work as the Dagster assets, without Dagster.

Each subcommand reads the settings of docs/contract.md §2 (flags override them), prints a JSON
summary on the last line of stdout, and exits 0 when its work completed (rejected rows are data,
not failures). When the run cannot proceed it exits 2 with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from lumo_core.config import TASKS, Settings
from lumo_core.errors import LumoError, StopRequested
from lumo_core.fileio import sha256_hex
from lumo_core.reporting import Reporter


def cmd_token_space(settings: Settings, reporter: Reporter, args: argparse.Namespace) -> dict[str, Any]:
    from lumo_core.config import load_uti_config
    from lumo_core.uti.unified import UnifiedTokenizer

    tokenizer = UnifiedTokenizer(load_uti_config(settings.uti_config))
    space = tokenizer.token_space
    path = space.write(settings.layout.token_space)
    summary = {
        "path": str(path),
        "sha256": space.sha256,
        "vocab_size_total": space.vocab_size_total,
        "ranges": [{"name": r.name, "start": r.start, "size": r.size} for r in space.ranges],
        "special_tokens": space.special_tokens,
        "runtime_sizes": tokenizer.runtime_sizes(),
    }
    reporter.report_materialization(
        {k: summary[k] for k in ("path", "sha256", "vocab_size_total", "ranges", "special_tokens")},
        data_version=space.sha256,
    )
    return summary


def cmd_audit_manifest(settings: Settings, reporter: Reporter, args: argparse.Namespace) -> dict[str, Any]:
    from lumo_core.config import load_uti_config
    from lumo_core.sample_data import manifest_for
    from lumo_core.tokenize.manifest_audit import audit_manifest

    config = load_uti_config(settings.uti_config)
    manifest = manifest_for(settings)
    if not manifest.is_file():
        raise LumoError(f"{manifest}: manifest file not found")
    report = audit_manifest(manifest, config, settings.layout.manifest_audit, map_path=config.map_path)
    report_sha = sha256_hex((settings.layout.manifest_audit / "report.json").read_bytes())
    reporter.report_materialization({**report, "report_sha256": report_sha}, data_version=report_sha)
    return report


def cmd_check(settings: Settings, reporter: Reporter, args: argparse.Namespace) -> dict[str, Any]:
    from lumo_core.audit.registry import run_check

    return run_check(args.check_name, settings, reporter)


def cmd_tokenize(settings: Settings, reporter: Reporter, args: argparse.Namespace) -> dict[str, Any]:
    from lumo_core.tokenize.build import start_run
    from lumo_core.tokenize.merge import merge_units
    from lumo_core.tokenize.run import tokenize, tokenize_unit

    if args.unit is not None:
        # One unit reports no materialization: the merge commits the asset.
        return tokenize_unit(settings, reporter, args.unit, force=args.force)
    if args.merge:
        run, _ = start_run(settings, load_models=False, force=args.force)
        summary = merge_units(run, reporter)
    else:
        summary = tokenize(settings, reporter, workers=args.workers, force=args.force)
    reporter.report_materialization(summary, data_version=summary["index_sha256"])
    return summary


def cmd_audit_shards(settings: Settings, reporter: Reporter, args: argparse.Namespace) -> dict[str, Any]:
    from lumo_core.audit.audits import audit_shards

    return audit_shards(settings, reporter)


def cmd_audit_uti(settings: Settings, reporter: Reporter, args: argparse.Namespace) -> dict[str, Any]:
    from lumo_core.audit.audits import audit_uti

    return audit_uti(settings, reporter)


def cmd_train(settings: Settings, reporter: Reporter, args: argparse.Namespace) -> dict[str, Any]:
    from lumo_core.lm.training import run_train

    return run_train(settings, reporter, overrides=_overrides(args), init_from=args.init_from, new_run=args.new_run)


def cmd_eval(settings: Settings, reporter: Reporter, args: argparse.Namespace) -> dict[str, Any]:
    from lumo_core.lm.eval import run_eval

    return run_eval(settings, reporter, overrides=_overrides(args))


def cmd_generate(settings: Settings, reporter: Reporter, args: argparse.Namespace) -> dict[str, Any]:
    from lumo_core.lm.generate_run import run_generate

    summary = run_generate(
        settings,
        reporter,
        args.task,
        text=args.text,
        image=args.image,
        audio=args.audio,
        out_dir=args.out,
        checkpoint=args.checkpoint,
        num_samples=args.num_samples,
        seed=args.seed,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
    )
    # Text answers go to stdout, one line a sample, ahead of the JSON summary line.
    for sample in summary["samples"]:
        for span in sample["spans"]:
            if "text" in span:
                print(" ".join(span["text"].splitlines()))
    return summary


def cmd_export_jsonl(settings: Settings, reporter: Reporter, args: argparse.Namespace) -> dict[str, Any]:
    from lumo_core.tokenize.jsonl_export import run_export_jsonl

    return run_export_jsonl(settings, reporter, out_dir=args.out)


def cmd_cache_prune(settings: Settings, reporter: Reporter, args: argparse.Namespace) -> dict[str, Any]:
    from lumo_core.tokenize.cache_prune import run_cache_prune

    return run_cache_prune(settings, reporter, keep_days=args.keep_days, max_bytes=args.max_bytes)


def cmd_bench_tokenize(settings: Settings, reporter: Reporter, args: argparse.Namespace) -> dict[str, Any]:
    from lumo_core.bench.tokenize import run_bench_tokenize

    return run_bench_tokenize(
        settings, reporter, samples=args.samples, preset=args.preset, memory_rows=args.memory_rows
    )


def cmd_bench_scale(settings: Settings, reporter: Reporter, args: argparse.Namespace) -> dict[str, Any]:
    from lumo_core.bench.scale import run_bench_scale

    return run_bench_scale(
        settings, reporter, rows=args.rows, incremental_rows=args.incremental_rows, memory_rows=args.memory_rows
    )


def cmd_bench_train(settings: Settings, reporter: Reporter, args: argparse.Namespace) -> dict[str, Any]:
    from lumo_core.bench.train import run_bench_train

    return run_bench_train(settings, reporter, args=_overrides(args))


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """`--set key=value` pairs (values parsed as YAML scalars)."""
    import yaml

    overrides: dict[str, Any] = {}
    for item in getattr(args, "set", None) or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise LumoError(f"--set {item!r}: expected key=value")
        overrides[key] = yaml.safe_load(value)
    return overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lumo", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--output-dir", type=Path, help="overrides LUMO_OUTPUT_DIR")
    common.add_argument("--manifest", type=Path, help="overrides LUMO_MANIFEST")
    common.add_argument("--uti-config", type=Path, help="overrides LUMO_UTI_CONFIG")
    common.add_argument("--train-config", type=Path, help="overrides LUMO_TRAIN_CONFIG")
    sub = parser.add_subparsers(dest="command", required=True)
    simple = {
        "token-space": (cmd_token_space, "build token_space.json from the tokenizer config"),
        "audit-manifest": (cmd_audit_manifest, "audit the manifest: schema, ids, files, media headers"),
        "tokenize": (cmd_tokenize, "tokenize the manifest into train/eval WebDataset shards"),
        "audit-shards": (cmd_audit_shards, "audit the shards: hashes, id ranges, decode spot-checks, retokenize"),
        "audit-uti": (cmd_audit_uti, "audit the tokenizers: determinism, sizes, encode/decode smoke test"),
    }
    for name, (handler, help_text) in simple.items():
        command = sub.add_parser(name, parents=[common], help=help_text)
        command.set_defaults(handler=handler)
        if name == "tokenize":
            which = command.add_mutually_exclusive_group()
            which.add_argument(
                "--unit",
                type=int,
                action="append",
                metavar="K",
                help="tokenize work unit K only (0 <= K < pipeline.work_units; repeat for several); the merge writes the shards",
            )
            which.add_argument(
                "--merge",
                action="store_true",
                help="only merge the completed units into shards, rejects, stats and index.json",
            )
            which.add_argument(
                "--workers",
                type=int,
                default=1,
                metavar="N",
                help="run the units in N processes at once (default 1: in this process)",
            )
            command.add_argument(
                "--force",
                action="store_true",
                help="rebuild even when up to date: units tokenized again from the media (token cache not read), shards rewritten",
            )
    for name, handler, help_text in (
        ("train", cmd_train, "train the token LM on the shards"),
        ("eval", cmd_eval, "evaluate the token LM on the eval split"),
    ):
        p = sub.add_parser(name, parents=[common], help=help_text)
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a training config field")
        if name == "train":
            p.add_argument(
                "--init-from",
                type=Path,
                metavar="PATH",
                help="start a new run from this checkpoint's weights (a model folder such as final/ or checkpoint-N/, or a LoRA checkpoint-N/); "
                "fresh optimizer and schedule; a different run in the output folder is moved whole to a sibling folder",
            )
            p.add_argument(
                "--new-run",
                action="store_true",
                help="when the output folder holds a run of other settings, move it whole to a sibling folder and start this run (without: refuse)",
            )
        p.set_defaults(handler=handler)
    gen = sub.add_parser(
        "generate", parents=[common], help="any-to-any generation from a checkpoint: media to --out, text to stdout"
    )
    gen.add_argument("--task", required=True, choices=TASKS, help="what to generate from what")
    gen.add_argument("--text", help="the input text (t2i, t2a)")
    gen.add_argument("--image", type=Path, metavar="FILE", help="the input image (i2t)")
    gen.add_argument("--audio", type=Path, metavar="FILE", help="the input audio (a2t)")
    gen.add_argument(
        "--out", type=Path, metavar="DIR", help="where decoded PNG and WAV files go (default: LUMO_OUTPUT_DIR/generate)"
    )
    gen.add_argument(
        "--checkpoint", type=Path, metavar="DIR", help="the model folder (default: LUMO_OUTPUT_DIR/lm_checkpoint/final)"
    )
    gen.add_argument(
        "--num-samples",
        type=int,
        default=1,
        metavar="N",
        help="samples to draw, with seeds SEED, SEED+1, ... (default 1)",
    )
    gen.add_argument(
        "--seed", type=int, help="seed of the first sample (default: sampling.seed of the training config)"
    )
    gen.add_argument("--temperature", type=float, help="overrides sampling.temperature")
    gen.add_argument("--top-k", type=int, help="overrides sampling.top_k (0: off)")
    gen.add_argument("--top-p", type=float, help="overrides sampling.top_p (1.0: off)")
    gen.add_argument("--max-new-tokens", type=int, help="overrides sampling.max_new_tokens")
    gen.set_defaults(handler=cmd_generate)
    export = sub.add_parser(
        "export-jsonl", parents=[common], help="write the tokenized shards as tokenized JSONL, one file per split"
    )
    export.add_argument(
        "--out", type=Path, metavar="DIR", help="the export folder (default: LUMO_OUTPUT_DIR/tokenized_jsonl)"
    )
    export.set_defaults(handler=cmd_export_jsonl)
    cache = sub.add_parser("cache", help="the token cache")
    prune = cache.add_subparsers(dest="cache", required=True).add_parser(
        "prune", parents=[common], help="remove token cache entries by age and size, oldest first"
    )
    prune.add_argument("--keep-days", type=float, metavar="N", help="remove entries written more than N days ago")
    prune.add_argument("--max-bytes", type=int, metavar="N", help="then remove the oldest until at most N bytes remain")
    prune.set_defaults(handler=cmd_cache_prune)
    from lumo_core.audit.registry import CHECKS

    check = sub.add_parser(
        "check", parents=[common], help="run one asset check of docs/contract.md §7 and print its outcome"
    )
    check.add_argument("check_name", choices=sorted(CHECKS))
    check.set_defaults(handler=cmd_check)
    bench = sub.add_parser("bench", help="benchmarks (print a JSON report on the last line)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    bt = bench_sub.add_parser(
        "tokenize", parents=[common], help="tokenizer pipeline throughput on the full-size preset"
    )
    bt.add_argument("--samples", type=int, default=256, help="rows in the synthetic manifest")
    bt.add_argument(
        "--preset", default="bench_full", help="embedded config name under lumo_core/data/configs, or a YAML path"
    )
    bt.add_argument(
        "--memory-rows", type=int, default=64, help="peak memory is measured at this many rows and at 10x as many"
    )
    bt.set_defaults(handler=cmd_bench_tokenize)
    bs = bench_sub.add_parser(
        "scale", parents=[common], help="work-unit scaling, incremental rebuild and manifest memory"
    )
    bs.add_argument(
        "--rows",
        type=int,
        default=6000,
        help="rows tokenized by `lumo tokenize --workers 1` and `--workers 2` (default models)",
    )
    bs.add_argument(
        "--incremental-rows",
        type=int,
        default=2000,
        help="rows of the full build before the manifest grows by 10%% (default models)",
    )
    bs.add_argument(
        "--memory-rows",
        type=int,
        default=100000,
        help="peak memory of the audit and unit assignment at this many rows and 10x as many",
    )
    bs.set_defaults(handler=cmd_bench_scale)
    btr = bench_sub.add_parser("train", parents=[common], help="training tokens/s against the HF Trainer")
    btr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a benchmark setting")
    btr.set_defaults(handler=cmd_bench_train)
    return parser


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (Dagster's Terminate, `kill`) becomes an error raised where the process is: the
    steps' cleanup runs (workers stopped, temporary files removed, SQLite rolled back) and the
    process exits 2 with a one-line reason within seconds. Completed work is kept for the rerun."""
    raise StopRequested("stopped by SIGTERM; completed work is kept: run the same command again to resume")


def _default_sigterm_in_forked_child() -> None:
    """A child forked while the handler is set (a data-loader worker, a library's fork pool) dies
    of SIGTERM as the kernel delivers it. With a Python handler it would not: a signal that lands
    just before the child blocks in a lock or a read is only looked at once that call returns, and
    `multiprocessing.Pool.terminate()` then waits forever for the child to exit."""
    if signal.getsignal(signal.SIGTERM) is _stop_on_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_default_sigterm_in_forked_child)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = args.command if args.command != "bench" else f"bench {args.bench}"
    # Under torchrun every rank runs this; only rank 0 reports to Dagster and prints the summary.
    is_main_process = os.environ.get("RANK", "0") == "0"
    # main() also runs inside other programs (tests, notebooks): the handler is theirs again on return.
    handler_installed = threading.current_thread() is threading.main_thread()
    if handler_installed:
        previous_handler = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        settings = Settings.from_env(
            output_dir=args.output_dir,
            manifest=args.manifest,
            uti_config=args.uti_config,
            train_config=args.train_config,
        )
        with Reporter(name, open_pipes=is_main_process) as reporter:
            summary = args.handler(settings, reporter, args)
    except LumoError as exc:
        print(f"lumo {name}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if handler_installed:
            # None: the previous handler was set outside Python and cannot be put back.
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous_handler is None else previous_handler)
    if is_main_process:
        print(json.dumps(summary, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
