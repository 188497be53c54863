"""bdiff: Bellman Diffusion — density and density-gradient fields, sampled with the Bellman SDE."""
__version__ = "0.1.0"
