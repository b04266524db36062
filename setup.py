"""Build script. Pure Python by default; ``LIE_KERNELS_BUILD_CUDA=1`` adds the CUDA
extension ``lie_kernels._C`` (csrc/; needs nvcc and a CUDA build of torch, no GPU;
archs from TORCH_CUDA_ARCH_LIST, default "8.0;9.0"). Install with
``pip install --no-build-isolation -e .`` so the build sees the installed torch.
Without the extension, ``python -m lie_kernels.cuda_build`` builds it just in time.
"""
import os

from setuptools import setup


def cuda_extension():
    from lie_kernels import cuda_build as cb

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    home = cb.cuda_home()
    if home:  # before torch reads it: for a wrapper nvcc, torch would guess /usr/local
        os.environ.setdefault("CUDA_HOME", home)
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if home:
        cpp_extension.CUDA_HOME = home
    ext = CUDAExtension(
        "lie_kernels._C", ["csrc/binding.cpp", "csrc/lie_kernels.cu"],
        include_dirs=[str(cb.CSRC)],
        extra_compile_args={"cxx": cb.host_flags(), "nvcc": ["-O3", "-std=c++17"]})
    return dict(ext_modules=[ext], cmdclass={"build_ext": BuildExtension})


setup(**(cuda_extension() if os.environ.get("LIE_KERNELS_BUILD_CUDA") == "1" else {}))
