"""The control plane as a library: message contracts between tiers, admission and dispatch, liveness.

It moves no tensors and imports no tier.
"""
