"""stats.json of the shards: token lengths per split and task, codebook usage per modality."""

from __future__ import annotations

from typing import Any

import numpy as np

from lumo_core.tokenize.sample_layout import SPLITS, npy_load
from lumo_core.tokenize.spool import MergedSpool, Spool
from lumo_core.uti.token_space import TokenSpace


def _describe(values: np.ndarray) -> dict[str, float | int]:
    return {
        "count": int(values.size),
        "min": int(values.min()),
        "mean": round(float(values.mean()), 4),
        "p50": round(float(np.percentile(values, 50)), 4),
        "p95": round(float(np.percentile(values, 95)), 4),
        "max": int(values.max()),
    }


def _usage(counts: np.ndarray) -> dict[str, float | int]:
    total = counts.sum()
    probabilities = counts[counts > 0] / max(total, 1)
    return {
        "distinct_codes": int((counts > 0).sum()),
        "codebook_size": int(counts.size),
        "utilisation": round(float((counts > 0).mean()), 6),
        "entropy_bits": round(float(-(probabilities * np.log2(probabilities)).sum()), 6),
        "total_codes": int(total),
    }


def compute_stats(spool: Spool | MergedSpool, space: TokenSpace) -> dict[str, Any]:
    """Token length statistics per split and task; codebook usage per modality."""
    import pandas as pd

    lengths = pd.DataFrame(list(spool.lengths()), columns=["split", "task", "n_tokens"])
    token_lengths: dict[str, dict[str, Any]] = {}
    histograms: dict[str, Any] = {}
    if len(lengths):
        for (split, task), group in lengths.groupby(["split", "task"], sort=True):
            token_lengths.setdefault(split, {})[task] = _describe(group["n_tokens"].to_numpy())
        edges = np.histogram_bin_edges(lengths["n_tokens"].to_numpy(), bins=20)
        for task, group in lengths.groupby("task", sort=True):
            counts, _ = np.histogram(group["n_tokens"].to_numpy(), bins=edges)
            histograms[task] = counts.tolist()
        histograms = {"bin_edges": [round(float(e), 4) for e in edges], "counts": histograms}
    text_counts = np.zeros(space.range("text").size, dtype=np.int64)
    image_counts = np.zeros(space.range("image").size, dtype=np.int64)
    audio_counts = np.zeros((space.n_audio_codebooks, space.audio_codebook_size), dtype=np.int64)
    for split in SPLITS:
        for _, _, members in spool.iter_split(split):
            # Every sample has every member; an absent modality's codes are empty.
            text_counts += np.bincount(npy_load(members["text.npy"]), minlength=text_counts.size)
            image_counts += np.bincount(npy_load(members["image.npy"]), minlength=image_counts.size)
            codes = npy_load(members["audio.npy"])
            for k in range(codes.shape[0]):
                audio_counts[k] += np.bincount(codes[k], minlength=audio_counts.shape[1])
    return {
        "n_samples": len(lengths),
        "token_lengths": token_lengths,
        "length_histogram": histograms,
        "codebook_usage": {
            "text": _usage(text_counts),
            "image": _usage(image_counts),
            "audio": {**_usage(audio_counts.reshape(-1)), "per_codebook": [_usage(c) for c in audio_counts]},
        },
    }
