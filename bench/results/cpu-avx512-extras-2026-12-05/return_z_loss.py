"""Liger-Kernel's z-loss logging (lse_square_scale with return_z_loss) as nllfused spells it,
against torch's composition of the same: (64, 10) fp32, one thread, paired medians of
alternating calls. The nllfused imported is the one on PYTHONPATH. python return_z_loss.py"""
import time

import torch
import torch.nn.functional as F

import nllfused


def median_pair(fa, fb, n=500):
    for _ in range(20):
        fa(), fb()
    ta, tb = [], []
    for _ in range(n):
        s = time.perf_counter()
        fa()
        ta.append(time.perf_counter() - s)
        s = time.perf_counter()
        fb()
        tb.append(time.perf_counter() - s)
    return sorted(ta)[n // 2] * 1e6, sorted(tb)[n // 2] * 1e6


def main():
    torch.set_num_threads(1)
    x = torch.randn(64, 10, requires_grad=True)
    t = torch.randint(0, 10, (64,))

    def ours():
        return nllfused.cross_entropy(x, t, z_loss=1e-4, return_z_loss=True)

    def ref():
        lse = torch.logsumexp(x, 1)
        z = 1e-4 * (lse * lse).mean()
        return F.cross_entropy(x, t) + z, z

    a, b = median_pair(ours, ref)
    c, d = median_pair(lambda: ours()[0].backward(), lambda: ref()[0].backward())
    print(f"return_z_loss fwd {a:.1f} vs {b:.1f} us ({b / a:.2f}x), "
          f"fwd+bwd {c:.1f} vs {d:.1f} us ({d / c:.2f}x)")


if __name__ == "__main__":
    main()
