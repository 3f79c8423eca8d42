"""Masked (absorbing-state) diffusion post-trained from the backbone: the MDLM baseline."""
