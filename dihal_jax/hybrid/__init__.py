"""Hybrid generation: bridge samples of h_l -> frozen upper layers -> tokens."""
