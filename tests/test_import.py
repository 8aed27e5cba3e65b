"""What `import nllfused` costs an eager user: not torch._dynamo (~150 MiB of memory and ~1 s),
which torch.compile and compiled autograd import when they are used, nor triton (~75 MiB and
~0.1 s), which the first Triton call imports."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from nllfused import _extension


def _run(code: str, tmp_path, **env) -> str:
    """stdout of `python -c code` in a fresh process, run from tmp_path: from the repository's
    root `python -c` would import the source tree's nllfused (sys.path[0] is the current
    directory), which in CI holds no built extension, not the installed one."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_leaves_dynamo_unimported(tmp_path):
    code = ("import sys, torch, nllfused\n"
            "assert nllfused.build_info()['built']\n"
            "nllfused.cross_entropy(torch.randn(3, 5), torch.tensor([0, 4, 2]))\n"
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
    assert _run(code, tmp_path).strip() == "[]"


def test_triton_is_imported_by_the_first_triton_call_only(tmp_path):
    """CPU calls of the C++ kernels -- loss and backward, statistics, the fused linear + CE --
    leave triton unimported; a backend="triton" call imports it, and runs."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    code = ("import sys, torch, nllfused\n"
            "assert nllfused.build_info()['built']\n"
            "x, t = torch.randn(3, 5, requires_grad=True), torch.tensor([0, 4, 2])\n"
            "nllfused.cross_entropy(x, t).backward()\n"
            "nllfused.cross_entropy(x, t, return_stats=True)[0].backward()\n"
            "w = torch.randn(5, 4, requires_grad=True)\n"
            "nllfused.linear_cross_entropy(torch.randn(3, 4), w, t).backward()\n"
            "print('triton' in sys.modules)\n"
            "y = nllfused.cross_entropy(x, t, backend='triton')\n"
            "torch.testing.assert_close(y, torch.nn.functional.cross_entropy(x, t))\n"
            "print('triton' in sys.modules)\n")
    assert _run(code, tmp_path, TRITON_INTERPRET="1").split() == ["False", "True"]


def test_constant_under_compile_marks_as_torch_does():
    """_extension.constant_under_compile stands in for torch.compiler.assume_constant_result."""
    def ours():
        return None

    def torchs():
        return None
    _extension.constant_under_compile(ours)
    torch.compiler.assume_constant_result(torchs)
    assert vars(torchs) and vars(ours) == vars(torchs)
