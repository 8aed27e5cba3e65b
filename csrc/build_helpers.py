"""Where the CUDA build finds nvcc and headers: shared by setup.py (the extension) and
tests/test_cuda_emulation.py (the CUDA host emulator), which load this file from the checkout.

Plain functions of the environment; nothing here imports nllfused.
"""
import glob
import os


def nvcc_unavailable_reason():
    """None when torch has CUDA and nvcc is at CUDA_HOME/bin/nvcc; else why the CUDA code cannot
    be compiled here."""
    import torch
    from torch.utils import cpp_extension
    if torch.version.cuda is None:
        return "torch has no CUDA build"
    home = cpp_extension.CUDA_HOME
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return "nvcc not found (set CUDA_HOME)"
    return None


def nvidia_wheel_includes():
    """Include directories of pip's nvidia-* wheels: torch's CUDA headers include cusparse.h etc.,
    which those wheels ship in site-packages/nvidia/<cuXX or library>/include rather than in
    CUDA_HOME."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]
