"""Distributional RL with Bellman Diffusion return densities."""
