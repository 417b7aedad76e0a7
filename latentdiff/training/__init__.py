"""Training: the shared trainer (accelerate loop, checkpoints, resume), the CLIP, VAE and U-Net stages, recipes."""
