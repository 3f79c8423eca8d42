"""Frozen decoder-only backbone (Llama-3.x, Qwen3) in Flax NNX."""
