"""Development tools, never imported by the runtime package ``lie_kernels``.

``python -m dev.kernel_report [80 90]`` (``make gate``): the static kernel health gate,
what the GPU compiler makes of every Triton and CUDA kernel the backends can launch.
"""
