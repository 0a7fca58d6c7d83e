"""Content versions of Lumo's three inputs: the manifest, the UTI config and the training config.

The Dagster layer records them as the data versions of the input assets (lumo_pipeline.inputs),
so an asset shows as unsynced the moment an input it was built from changes. A config's version
is the sha256 of its validated content in canonical JSON: a comment, the key order or a default
written out does not change it; any setting that does change a value does, whichever part of
the outputs it shapes (split.eval_fraction, a codec's bandwidth, a batch size). The manifest's
version is the sha256 of its bytes, the same digest manifest_audit and the shards record.

The UTI config's version also covers the tokenizers' weights (docs/contract.md §8): the sha256 of
the files of each local model folder (lumo_core.uti.weights, cached by stat, so an observation
costs a few stats), so weights changed in place at the same path change the version, and with it
`token_space` and everything downstream shows as unsynced. A hub model is named by its pinned
revision, which is in the config already; a builtin by its recipe revision (its weights are a
function of it, and reading a version must not build it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from lumo_core.config import Settings, UTIConfig, load_uti_config
from lumo_core.errors import ConfigError, LumoError
from lumo_core.fileio import canonical_json_bytes, file_sha256, sha256_hex
from lumo_core.lm.train_config import load_train_config
from lumo_core.sample_data import SAMPLE_VERSION
from lumo_core.uti.embedded import is_builtin, model_identity
from lumo_core.uti.weights import weights_identity

MISSING = "missing"
T = TypeVar("T", bound=BaseModel)


def manifest_version(settings: Settings) -> str:
    """sha256 of the manifest file; the embedded sample is named by its generator's version (it
    is generated on first use, and reading a version must not write it)."""
    if settings.manifest is None:
        return f"embedded-sample-{SAMPLE_VERSION}"
    return file_sha256(settings.manifest) if Path(settings.manifest).is_file() else MISSING


def uti_config_version(settings: Settings) -> str:
    version, config = _config_version(settings.uti_config, load_uti_config)
    if config is None:
        return version
    return sha256_hex(canonical_json_bytes({"config": version, "weights": tokenizer_weights(config)}))


def tokenizer_weights(config: UTIConfig) -> dict[str, str]:
    """Per modality, what names its tokenizer's weights: the sha256 of a local model's files, a
    builtin's identity, `hub@<revision>`, or why the weights could not be read (the step that
    loads them reports it with the path)."""
    weights = {}
    for modality in ("text", "image", "audio"):
        tokenizer = getattr(config.tokenizers, modality)
        if tokenizer.kind == "dummy":
            weights[modality] = "dummy"
        elif is_builtin(tokenizer.path):
            weights[modality] = model_identity(tokenizer.path)
        else:
            try:
                identity = weights_identity(tokenizer.path, tokenizer.revision)
            except (LumoError, OSError) as exc:
                weights[modality] = f"unreadable: {exc}"
                continue
            weights[modality] = identity.get("sha256") or f"hub@{identity['hub_revision']}"
    return weights


def train_config_version(settings: Settings) -> str:
    return _config_version(settings.train_config, load_train_config)[0]


def _config_version(path: Path | None, load: Callable[[Path | None], T]) -> tuple[str, T | None]:
    """sha256 of the validated config in canonical JSON, and the config. A config that fails
    validation gets the sha256 of its bytes, marked invalid (and no config): it still changes the
    version, and the step that reads it reports the error with the field."""
    if path is not None and not Path(path).is_file():
        return MISSING, None
    try:
        config = load(path)
    except ConfigError:
        return (f"invalid-{file_sha256(path)}" if path is not None else "invalid"), None
    return sha256_hex(canonical_json_bytes(config.model_dump(mode="json"))), config


def input_versions(settings: Settings) -> dict[str, str]:
    """The version of every input, keyed by its asset name in Dagster."""
    return {
        "manifest": manifest_version(settings),
        "uti_config": uti_config_version(settings),
        "train_config": train_config_version(settings),
    }
