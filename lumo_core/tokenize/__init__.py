"""Turning a manifest into shards: the manifest parser, decode workers, model calls, the per-row pipeline,
runs and work units, the token cache, the shard writer, stats and the JSONL export."""
