"""The diffusion bridge: a 1D UNet denoiser over sequences of hidden states."""
