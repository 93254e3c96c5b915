"""Encoder tier: worker processes that turn media bytes into embedding tensors in the Redis tensor cache.

Knows nothing about HTTP; one worker serves one modality.
"""
