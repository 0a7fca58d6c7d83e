"""Pictures for materialization metadata, as markdown with an embedded PNG data URI.

Dagster has no image metadata type; the UI renders markdown images, data URIs included.
matplotlib is imported inside the functions (Agg backend) to keep definition loading light.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any


def png_markdown(png: bytes, alt: str) -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def image_file_markdown(path: Path, alt: str) -> str:
    return png_markdown(path.read_bytes(), alt)


def _figure_png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    return buffer.getvalue()


def token_length_histogram_png(length_histogram: dict[str, Any]) -> bytes:
    """Stacked bars of sequence lengths per task, from stats.json `length_histogram`
    (`bin_edges` shared by all tasks, `counts` per task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    edges = np.asarray(length_histogram["bin_edges"], dtype=float)
    widths = np.diff(edges)
    fig, ax = plt.subplots(figsize=(6, 3))
    bottom = np.zeros(widths.size)
    for task, counts in sorted(length_histogram["counts"].items()):
        counts = np.asarray(counts, dtype=float)
        ax.bar(
            edges[:-1], counts, width=widths, bottom=bottom, align="edge", label=task, edgecolor="white", linewidth=0.5
        )
        bottom += counts
    ax.set_xlabel("tokens per sequence")
    ax.set_ylabel("samples")
    ax.set_title("Sequence length by task")
    ax.legend(fontsize="small")
    try:
        return _figure_png(fig)
    finally:
        plt.close(fig)


def codebook_usage_png(codebook_usage: dict[str, Any]) -> bytes:
    """Share of each codebook's codes used at least once, from stats.json `codebook_usage`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, shares = [], []
    for modality in ("text", "image"):
        labels.append(modality)
        shares.append(codebook_usage[modality]["utilisation"])
    for k, usage in enumerate(codebook_usage["audio"]["per_codebook"]):
        labels.append(f"audio cb{k}")
        shares.append(usage["utilisation"])
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.barh(labels, shares, color="#4c72b0")
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("share of codes used at least once")
    ax.set_title("Codebook usage")
    try:
        return _figure_png(fig)
    finally:
        plt.close(fig)
