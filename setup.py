"""Builds grokalign_fast._C from csrc/ against the installed torch.

CPU-only unless the installed torch is a CUDA build and a CUDA toolkit is
found; override with GROKALIGN_FORCE_CUDA=1 or GROKALIGN_FORCE_CPU=1.
A CUDA build on a machine without a GPU needs TORCH_CUDA_ARCH_LIST (e.g. "9.0").
"""
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - explained to the user
    sys.exit("grokalign_fast: install torch first, then `pip install -e . --no-build-isolation`")

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_wanted() -> bool:
    if os.environ.get("GROKALIGN_FORCE_CPU", "0") == "1":
        return False
    if os.environ.get("GROKALIGN_FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _nvidia_include_dirs():
    """Headers of the pip-installed CUDA libraries (cuBLAS, cuSPARSE, ...) that
    ATen/cuda/CUDAContext.h needs when they are not in the toolkit folder."""
    dirs = []
    for site in sys.path:
        dirs += glob.glob(os.path.join(site, "nvidia", "*", "include"))
        dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def extensions():
    use_cuda = _cuda_wanted()
    sources = [os.path.join("csrc", "grokalign.cpp"), os.path.join("csrc", "_C.cpp")]
    # csrc/autograd: device-agnostic autograd kernels, in every build; csrc/cpu, csrc/cuda: per device.
    sources += sorted(glob.glob(os.path.join("csrc", "autograd", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -fno-trapping-math: lets GCC turn the float selects of csrc/cpu/simd_math.h's loops into vector
    # blends (the results are the same; only floating-point exception flags may differ).
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math"]
    extra = {"cxx": cxx}
    include_dirs = [os.path.join(ROOT, "csrc")]
    ext_cls = cpp_extension.CppExtension
    if use_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        extra["nvcc"] = ["-O3", "-lineinfo"]
        include_dirs += _nvidia_include_dirs()
        ext_cls = cpp_extension.CUDAExtension
    return [
        ext_cls(
            "grokalign_fast._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    ]


setup(
    packages=find_packages(include=["grokalign_fast", "grokalign_fast.*"]),
    package_data={"grokalign_fast": ["data/*"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
