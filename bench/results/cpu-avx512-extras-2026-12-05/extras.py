"""nllfused.cross_entropy with z_loss / logit_scale / softcap against torch's own composition of
the same loss (F.cross_entropy after x * a or s * tanh(x / s), plus z * logsumexp^2 over the
counted rows), paired in one process: medians of alternating calls, forward (input requiring
grad) and forward+backward. The nllfused imported is the one on PYTHONPATH (an old build's
folder for an A/B). Usage: python extras.py THREADS [quick]"""
import sys
import time

import torch
import torch.nn.functional as F

import nllfused

OPTIONS = {"z_loss": dict(z_loss=1e-4), "logit_scale": dict(logit_scale=0.7),
           "softcap": dict(softcap=30.0)}
CASES = [((64, 10), torch.float32, 400), ((256, 1000), torch.float32, 100),
         ((4096, 1000), torch.float32, 20), ((1024, 32000), torch.float32, 5),
         ((1024, 32000), torch.bfloat16, 5)]


def torch_loss(x, t, z_loss=0.0, logit_scale=1.0, softcap=None):
    z = x * logit_scale if logit_scale != 1.0 else x
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(z, t)
    if z_loss:
        lse = torch.logsumexp(z.float(), 1)
        loss = loss + z_loss * (lse * lse).mean()  # every row counted here
    return loss


def median_pair(fa, fb, reps):
    for _ in range(3):
        fa(), fb()
    ta, tb = [], []
    for _ in range(reps):
        s = time.perf_counter(); fa(); ta.append(time.perf_counter() - s)
        s = time.perf_counter(); fb(); tb.append(time.perf_counter() - s)
    return sorted(ta)[reps // 2], sorted(tb)[reps // 2]


def main():
    torch.set_num_threads(int(sys.argv[1]))
    cases = CASES[:3] if "quick" in sys.argv else CASES
    print("| shape | dtype | option | fwd nllfused | fwd torch | x | fwd+bwd nllfused | "
          "fwd+bwd torch | x |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape, dtype, reps in cases:
        gen = torch.Generator().manual_seed(0)
        x = (torch.randn(shape, generator=gen) * 3).to(dtype).requires_grad_()
        t = torch.randint(0, shape[1], (shape[0],), generator=gen)
        for name, kw in OPTIONS.items():
            ours = lambda: nllfused.cross_entropy(x, t, **kw)  # noqa: E731
            ref = lambda: torch_loss(x, t, **kw)  # noqa: E731
            fa, fb = median_pair(ours, ref, reps)
            ba, bb = median_pair(lambda: ours().backward(), lambda: ref().backward(), reps)
            unit, k = ("us", 1e6) if fa < 1e-3 else ("ms", 1e3)
            print(f"| {shape} | {str(dtype)[6:]} | {name} | {fa * k:.1f} {unit} | {fb * k:.1f} "
                  f"{unit} | {fb / fa:.2f} | {ba * k:.1f} {unit} | {bb * k:.1f} {unit} | "
                  f"{bb / ba:.2f} |", flush=True)


if __name__ == "__main__":
    main()
