"""The Redis layer: connections, key layout, streams, the tensor codec and cache, an embedded server.

This package knows nothing about models, HTTP or tiers; every tier reaches Redis through it.
"""
