# Source before the tests: the CUDA build environment of this (GPU-less, 2-core) machine.
#   . .ci/cuda_env.sh
# lie_kernels/cuda_build.py finds all of this by itself (including the pip CUDA headers,
# added with -idirafter); exporting it makes the build explicit and lets setup.py /
# torch.utils.cpp_extension agree with it.
_lk_nvcc=$(command -v nvcc || true)
if [ -z "${CUDA_HOME:-}" ] && [ -n "$_lk_nvcc" ]; then
  # nvcc on PATH may be a wrapper script (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`)
  _lk_real=$(sed -n 's|^exec[[:space:]]\{1,\}\([^[:space:]]*/bin/nvcc\).*|\1|p' "$_lk_nvcc" | head -n 1)
  CUDA_HOME=$(dirname "$(dirname "$(readlink -f "${_lk_real:-$_lk_nvcc}")")")
  export CUDA_HOME
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"  # 2 cores here
unset _lk_nvcc _lk_real
