"""Build nllfused: the Python package, the Triton kernels and the C++/CUDA extension nllfused._C.

The C++ part is always built. The CUDA part is built whenever torch has CUDA and nvcc is found
(CUDA_HOME), GPU or not, so that machines without a GPU still compile it. NLLFUSED_NO_CUDA=1
skips it. TORCH_CUDA_ARCH_LIST picks the architectures; the default covers what current torch
wheels run on (Ampere sm_80, Hopper sm_90, Blackwell sm_100 and sm_120) and embeds PTX for the
newest, which later GPUs compile at load time. nllfused.build_info() reports the list, and
backend="auto" uses the CUDA kernels only on a GPU that list can run on (triton otherwise).

The extension links against the torch it was built with: install_requires pins that torch's
minor release, so that pip does not put the wheel beside a torch whose ABI it does not match.
"""
import glob
import importlib.util
import os

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_helpers():
    # csrc/build_helpers.py, shared with tests/test_cuda_emulation.py: loaded by path, as csrc/
    # is no package.
    spec = importlib.util.spec_from_file_location(
        "nllfused_build_helpers", os.path.join(ROOT, "csrc", "build_helpers.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_helpers = _load_build_helpers()
DEFAULT_ARCHS = "8.0;9.0;10.0;12.0+PTX"
TORCH_RELEASE = ".".join(torch.__version__.split("+")[0].split(".")[:2])  # e.g. "2.14"


def cuda_wanted():
    if os.environ.get("NLLFUSED_NO_CUDA", "0") == "1":
        return False
    return build_helpers.nvcc_unavailable_reason() is None


def extension():
    with_cuda = cuda_wanted()
    # The CPU kernels: csrc/cpu/ce_cpu.cpp (the op layer) and one translation unit per
    # instruction set, kernels_<isa>.cpp (csrc/cpu/kernels.h).
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # Headers (and the helper above) are listed so that an sdist carries them and a change to
    # one rebuilds the extension.
    depends = sorted(glob.glob("csrc/**/*.h", recursive=True) +
                     glob.glob("csrc/**/*.cuh", recursive=True)) + ["csrc/build_helpers.py"]
    # torch picks the C++ standard (C++20 for torch >= 2.10). -ffp-contract=off: floating-point
    # expressions as written, every multiply-add an explicit one (csrc/cpu/ce_cpu_kernels.h, Tf).
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"]
    macros = [("NLLFUSED_TORCH_VERSION", '"%s"' % torch.__version__)]
    if not with_cuda:
        return cpp_extension.CppExtension(
            "nllfused._C", sources, depends=depends, define_macros=macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    macros += [("NLLFUSED_WITH_CUDA", None), ("NLLFUSED_CUDA_ARCHS", '"%s"' % archs)]
    nvcc = ["-O3", "--use_fast_math", "-lineinfo"]
    return cpp_extension.CUDAExtension(
        "nllfused._C", sources, depends=depends, define_macros=macros,
        include_dirs=build_helpers.nvidia_wheel_includes(),
        extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])


setup(
    name="nllfused",
    version="0.1.0",
    description=("Fused log-softmax + NLL (cross-entropy) kernels for PyTorch, "
                 "exact torch semantics"),
    python_requires=">=3.10",
    packages=["nllfused", "nllfused.backends", "nllfused.kernels", "nllfused.bench",
              "nllfused.integrations"],
    # One import name: kernels/ and bench/ install as nllfused.kernels and nllfused.bench.
    package_dir={"nllfused": "nllfused", "nllfused.kernels": "kernels", "nllfused.bench": "bench"},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    install_requires=[f"torch=={TORCH_RELEASE}.*", "numpy"],
    extras_require={"test": ["pytest", "hypothesis"], "bench": ["matplotlib"],
                    "transformers": ["transformers"]},
    entry_points={"console_scripts": ["nllfused-bench=nllfused.bench.cli:main"]},
    zip_safe=False,
)
