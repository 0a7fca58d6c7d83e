"""The Unified Token Interface: the token space, the tokenizers behind it (adapters, embedded models), media
reading and the canonical sequence layout."""
