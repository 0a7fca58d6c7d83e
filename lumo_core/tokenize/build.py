"""One build's shared facts: the config, the manifest, the token space and the run key that every
work unit and the merge agree on (TokenizeRun), the units' spools and locks, and start_run, which
reads and cross-checks them."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lumo_core.config import Settings, UTIConfig, load_uti_config
from lumo_core.errors import DamagedFileError, LumoError, rebuild_hint
from lumo_core.fileio import exclusive_lock, sha256_hex
from lumo_core.tokenize.pipeline import cache_recipe_for
from lumo_core.tokenize.spool import PAYLOAD_MAGIC, Spool
from lumo_core.tokenize.staging import committed_build
from lumo_core.tokenize.staleness import run_key_for, stale_reason
from lumo_core.tokenize.token_cache import TokenCache
from lumo_core.tokenize.units import unit_spool_path
from lumo_core.uti.token_space import TokenSpace

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from lumo_core.reporting import Reporter
    from lumo_core.uti.unified import UnifiedTokenizer


def unit_lock(work_dir: Path, unit: int) -> AbstractContextManager[None]:
    """Held while a process tokenizes unit K: one writer of a unit's spool at a time."""
    return exclusive_lock(work_dir / f"unit-{unit:05d}.lock", f"`lumo tokenize --unit {unit}`")


@dataclass
class TokenizeRun:
    """What every unit and the merge of one build agree on."""

    settings: Settings
    config: UTIConfig
    manifest: Path
    space: TokenSpace
    manifest_sha256: str
    run_key: str
    out_dir: Path
    # `lumo tokenize --force` (the `force` run config in Dagster): every unit is tokenized again
    # from the media, without reading the token cache, and the shards are rewritten even when
    # they match index.json.
    force: bool = False

    @property
    def work_dir(self) -> Path:
        return self.out_dir / ".work"

    @property
    def n_units(self) -> int:
        return self.config.pipeline.work_units

    def unit_key(self, unit: int) -> str:
        # The payload layout is part of a spool's identity: a spool of another layout is dropped.
        return sha256_hex(f"{self.run_key}\0unit {unit}\0payload {PAYLOAD_MAGIC.decode().strip()}".encode())

    @property
    def lock_path(self) -> Path:
        """Held by `lumo tokenize` and the merge: one writer of the shards folder at a time."""
        return self.out_dir / ".lock"

    def unit_lock(self, unit: int) -> AbstractContextManager[None]:
        return unit_lock(self.work_dir, unit)

    def token_cache(self) -> TokenCache:
        root = (
            Path(self.config.pipeline.token_cache_dir)
            if self.config.pipeline.token_cache_dir
            else self.out_dir.parent / "token_cache"
        )
        return TokenCache(root, cache_recipe_for(self.config, self.space.sha256))

    def up_to_date(self) -> bool:
        return self.stale_reason() is None

    def stale_reason(self) -> str | None:
        """Why the shards on disk are not this build's (None: they are). Beyond the run key, the
        files are verified against index.json: every shard's size always, and every shard's
        sha256 (and the dataset card's) while the shards total at most FULL_HASH_MAX_BYTES;
        above that, the sha256 of a spread sample of HASH_SAMPLE_SHARDS shards."""
        return stale_reason(committed_build(self.out_dir), self.run_key)

    def discard_unit(self, unit: int) -> None:
        """Remove the unit's spool (with SQLite's side files), so the unit starts over."""
        path = unit_spool_path(self.work_dir, unit)
        for leftover in path.parent.glob(path.name + "*"):
            leftover.unlink()

    def open_unit(self, unit: int, reporter: Reporter | None = None) -> Spool:
        """The unit's spool for this build; a spool left by another build, or damaged, is
        dropped (and the unit tokenized again)."""
        path = unit_spool_path(self.work_dir, unit)
        try:
            spool = Spool(path)
            stale = spool.get_meta("run_key") not in (None, self.unit_key(unit))
        except (DamagedFileError, sqlite3.DatabaseError) as exc:
            if reporter is not None:
                reporter.log(f"unit {unit}: its spool is damaged ({exc}): tokenizing the unit again")
            spool, stale = None, True
        if stale:
            if spool is not None:
                spool.close()
            self.discard_unit(unit)
            spool = Spool(path)
        if spool.get_meta("run_key") is None:
            spool.set_meta("run_key", self.unit_key(unit))
        return spool

    def unit_complete(self, unit: int) -> bool:
        path = unit_spool_path(self.work_dir, unit)
        if not path.is_file():
            return False
        try:
            spool = Spool(path)
        except DamagedFileError:
            return False
        try:
            return spool.get_meta("run_key") == self.unit_key(unit) and spool.get_meta("complete") == "1"
        except sqlite3.DatabaseError:
            return False
        finally:
            spool.close()


def start_run(
    settings: Settings, tokenizer: UnifiedTokenizer | None = None, load_models: bool = True, force: bool = False
) -> tuple[TokenizeRun, UnifiedTokenizer | None]:
    """Read the config, the manifest and the token space, and check they agree. Without models
    (the merge) the recorded token space stands for the tokenizers'."""
    from lumo_core.sample_data import manifest_for
    from lumo_core.tokenize.manifest import manifest_sha256
    from lumo_core.uti.unified import UnifiedTokenizer

    config = load_uti_config(settings.uti_config)
    recorded_space = TokenSpace.read_output(settings.layout.token_space)
    manifest = manifest_for(settings)
    if not manifest.is_file():
        raise LumoError(f"{manifest}: manifest file not found")
    if tokenizer is None and load_models:
        tokenizer = UnifiedTokenizer(config)
    space = tokenizer.token_space if tokenizer is not None else recorded_space
    if space.sha256 != recorded_space.sha256:
        raise LumoError(
            f"the token space of {settings.uti_config or 'the default config'} ({space.sha256[:12]}) differs from "
            f"{settings.layout.token_space}/token_space.json ({recorded_space.sha256[:12]}): rebuild it: {rebuild_hint('token_space', 'lumo token-space')}"
        )
    out_dir = settings.layout.tokenized_shards
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_sha = manifest_sha256(manifest)
    run = TokenizeRun(
        settings=settings,
        config=config,
        manifest=manifest,
        space=space,
        manifest_sha256=manifest_sha,
        run_key=run_key_for(manifest_sha, config, space.sha256),
        out_dir=out_dir,
        force=force,
    )
    return run, tokenizer
