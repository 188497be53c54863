"""Kernels and their plain PyTorch reference twins. Imports nothing from the engine."""
from .reference import field_matching_reference, sde_step_reference
from .torch_path import (field_matching_chunked, field_matching_naive, field_matching_torch,
                         has_fused_cpu_attention, sde_step_torch)

__all__ = [
    "field_matching_reference", "sde_step_reference", "field_matching_chunked",
    "field_matching_naive", "field_matching_torch", "has_fused_cpu_attention", "sde_step_torch",
]
