"""come_rl: planning with diffusion world models that remember (Composition of Memory Experts)."""
__version__ = "0.1.0"
