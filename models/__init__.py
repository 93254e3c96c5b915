"""Knowledge of model families, shared by every tier and importing none of them.

How a checkpoint directory splits into encoder parts and backbone layers, its tokenizer and chat template, and how
many placeholder tokens a media part expands to. Each tier loads only its part through this package.
"""
