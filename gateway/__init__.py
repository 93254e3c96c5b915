"""The gateway tier: OpenAI-compatible HTTP (and later WebSocket) in front of the encoder and backbone tiers.

It validates, applies the chat template, tokenizes, queues media for the encoders, sends prompt plans to the backbone
and streams detokenized text out. It runs no model and never holds an encoder output tensor.
"""
