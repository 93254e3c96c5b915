"""Backbone tier: shard workers that fuse prompt plans into embeddings, run the language model with a KV cache and
stream token ids back. Knows nothing about HTTP or media decoding."""
