"""Training state as data: a JSON file plus a safetensors file, read back without unpickling.

A checkpoint's optimizer, schedule and rank states (token counts, RNG states) hold tensors, numpy
arrays, tuples and integer-keyed dicts. `save_state` writes the structure to `<stem>.json` with
every tensor and array replaced by a reference into `<stem>.safetensors`; `load_state` rebuilds it.
Only the tags below are understood and nothing else is built from the files, so a planted file can
at worst be refused: there is no pickle, and nothing in the files names code to run. Any file that
does not parse is refused with its path. (The data plan's state is plain JSON in trainer_state.json.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lumo_core.errors import LumoError
from lumo_core.fileio import atomic_write_bytes

TENSOR, NDARRAY, TUPLE, FROZENSET, ITEMS = ("__tensor__", "__ndarray__", "__tuple__", "__frozenset__", "__items__")


def read_json(path: Path) -> Any:
    """A JSON file Lumo wrote, or a LumoError naming it (never anything but JSON parsing)."""
    try:
        return json.loads(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise LumoError(f"refused {path}: not a JSON file Lumo wrote ({type(exc).__name__}: {exc})") from None


def read_safetensors(path: Path) -> dict[str, Any]:
    """A safetensors file's tensors (on the CPU), or a LumoError naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise LumoError(f"refused {path}: not a safetensors file ({type(exc).__name__}: {exc})") from None


def check_safetensors(path: Path) -> None:
    """Refuse `path` unless its safetensors header parses (the tensors are not read)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            handle.keys()
    except Exception as exc:
        raise LumoError(f"refused {path}: not a safetensors file ({type(exc).__name__}: {exc})") from None


def save_state(stem: Path, state: Any) -> list[Path]:
    """Write `state` to `<stem>.json` and `<stem>.safetensors`; returns the two paths."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}

    def encode(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = value.detach().cpu().contiguous()
            return {TENSOR: key}
        if isinstance(value, np.ndarray):
            key = f"t{len(tensors)}"
            tensors[key] = torch.from_numpy(np.ascontiguousarray(value))
            return {NDARRAY: key}
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value) and not any(k.startswith("__") for k in value):
                return {k: encode(v) for k, v in value.items()}
            return {ITEMS: [[encode(k), encode(v)] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {TUPLE: [encode(v) for v in value]}
        if isinstance(value, frozenset | set):
            return {FROZENSET: sorted(encode(v) for v in value)}
        if isinstance(value, list):
            return [encode(v) for v in value]
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise TypeError(f"training state holds a {type(value).__name__}, which state_files cannot store")

    structure = encode(state)
    json_path, tensor_path = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".safetensors")
    save_file(tensors, tensor_path)
    atomic_write_bytes(json_path, json.dumps(structure, sort_keys=True).encode())
    return [json_path, tensor_path]


def load_state(stem: Path) -> Any:
    """What `save_state(stem, ...)` wrote, or a LumoError naming the file that does not parse."""
    import torch

    json_path, tensor_path = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".safetensors")
    structure = read_json(json_path)
    tensors = read_safetensors(tensor_path)

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(v) for v in value]
        if not isinstance(value, dict):
            return value
        if TENSOR in value or NDARRAY in value:
            tensor = tensors.get(value.get(TENSOR, value.get(NDARRAY)))
            if not isinstance(tensor, torch.Tensor):
                raise LumoError(f"refused {json_path}: it names a tensor {value} that {tensor_path} does not hold")
            return tensor.numpy() if NDARRAY in value else tensor
        if TUPLE in value:
            return tuple(decode(v) for v in value[TUPLE])
        if FROZENSET in value:
            return frozenset(decode(v) for v in value[FROZENSET])
        if ITEMS in value:
            return {_hashable(decode(k)): decode(v) for k, v in value[ITEMS]}
        # save_state stores a dict with `__` keys as ITEMS: such a key here is not Lumo's.
        unknown = sorted(k for k in value if k.startswith("__"))
        if unknown:
            raise LumoError(f"refused {json_path}: unknown state tag {unknown[0]!r}")
        return {k: decode(v) for k, v in value.items()}

    try:
        return decode(structure)
    except (TypeError, KeyError, ValueError) as exc:
        raise LumoError(f"refused {json_path}: not a training state Lumo wrote ({type(exc).__name__}: {exc})") from None


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key
