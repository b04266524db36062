"""lie_kernels: fused kernels for Lie-group (Hadamard) parameter-efficient fine-tuning.

``W' = W ⊙ exp_K(s·Δ)`` (LieRA, arXiv 2504.00851), with Δ from Tucker factors
(``lie_weight``) or a low-rank product (``lie_weight_lowrank``).
"""
from .backends import available_backends
from .functional import lie_weight, lie_weight_lowrank
from .series import exp_series
from .tucker import mode_product, tucker
from . import nn
from .nn import inject, merge, merge_and_unload, trainable_parameters, unload, unmerge

__all__ = ["exp_series", "mode_product", "tucker", "lie_weight", "lie_weight_lowrank",
           "available_backends", "nn", "inject", "merge", "unmerge", "trainable_parameters",
           "unload", "merge_and_unload"]
__version__ = "0.1.0"
