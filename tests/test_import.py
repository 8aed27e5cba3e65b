"""What `import nllfused` costs an eager user: not torch._dynamo (~150 MiB of memory and ~1 s),
which torch.compile and compiled autograd import when they are used."""
import subprocess
import sys

import torch

from nllfused import backends


def test_import_leaves_dynamo_unimported():
    code = ("import sys, torch, nllfused\n"
            "nllfused.cross_entropy(torch.randn(3, 5), torch.tensor([0, 4, 2]))\n"
            "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_constant_under_compile_marks_as_torch_does():
    """backends._constant_under_compile stands in for torch.compiler.assume_constant_result."""
    def ours():
        return None

    def torchs():
        return None
    backends._constant_under_compile(ours)
    torch.compiler.assume_constant_result(torchs)
    assert vars(torchs) and vars(ours) == vars(torchs)
