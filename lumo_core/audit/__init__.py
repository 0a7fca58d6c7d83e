"""Checks and audits: the check registry and outcome, checks on shards, tokenizers and checkpoints, and the
audit reports built from them."""
