"""The fused operations, each an autograd node that saves nothing the size of W.

* ``weight``: ``W' = W ⊙ exp_K(s·u@p)`` (``apply``; custom op ``lie_kernels::lie_gemm``);
* ``layer``: a whole Lie layer, ``conv/linear(x, W')`` with W' rebuilt in backward
  (``lie_layer``; custom ops ``lie_kernels::lie_linear``/``lie_conv``);
* ``many``: many layers' W' in one call (``lie_gemm_many``).

``common`` holds what they share (backend resolution, error texts, autocast guard); the
order encoding they pass to kernels and op schemas is ``lie_kernels.order``.
"""
from .layer import conv_geometry, fusable, lie_layer
from .many import lie_gemm_many
from .weight import apply

__all__ = ["apply", "lie_layer", "fusable", "conv_geometry", "lie_gemm_many"]
