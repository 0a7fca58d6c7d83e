"""Lumo core library: the Unified Token Interface, the dataset pipeline and the token LM trainer.

Never imports Dagster; heavy libraries (torch, transformers, diffusers) are imported inside the
functions that need them so that `import lumo_core` stays cheap.
"""

__version__ = "0.1.0"
