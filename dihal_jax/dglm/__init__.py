"""DGLM: a sentence-latent diffusion model proposes, the frozen AR backbone writes (soft
prompts), and linear classifiers on the latent steer attributes (dglm/run.py)."""
