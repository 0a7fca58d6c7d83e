"""Text: any Hugging Face tokenizer (`AutoTokenizer.from_pretrained`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from lumo_core.uti.adapters.base import TextAdapter, _from_pretrained
from lumo_core.uti.weights import weights_identity


class HFTextAdapter(TextAdapter):
    """Any Hugging Face tokenizer; ids are the tokenizer's own, without its BOS/EOS."""

    def __init__(self, path: str, name: str, revision: str | None = None) -> None:
        from transformers import AutoTokenizer

        self.name = name
        self.tokenizer = _from_pretrained(AutoTokenizer, path, "text tokenizer", revision)
        self.weights = weights_identity(path, revision)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

    def decode(self, ids: np.ndarray) -> str:
        return self.tokenizer.decode(
            np.asarray(ids).tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def describe(self) -> dict[str, Any]:
        from lumo_core.fileio import canonical_json_bytes, sha256_hex

        return {
            "tokenizer": self.name,
            "kind": "hf",
            "vocab_size": self.vocab_size,
            # Same vocabulary file under another name or path gives the same sha: it is the
            # string -> id table itself that decides the text ids.
            "vocab_sha256": sha256_hex(canonical_json_bytes(self.tokenizer.get_vocab())),
            # The files themselves too: merges, normalizer and pre-tokenizer rules decide the
            # ids as much as the vocabulary does.
            "weights": self.weights,
        }
