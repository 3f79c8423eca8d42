"""Evaluation of generated text and hidden states: gen PPL, diversity, memorization, spread."""
