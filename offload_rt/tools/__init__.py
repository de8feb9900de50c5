"""Offline tools over checkpoints (quantize), apart from the runtime."""
