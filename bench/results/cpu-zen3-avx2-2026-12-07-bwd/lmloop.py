# One configuration of the LM loss timed in a loop: median and min of calls over SECS seconds.
# usage: python lmloop.py THREADS DTYPE NxC SECS [fwd|fwdbwd|bwd|stats]
# bwd: the backward alone (torch.autograd.grad of one forward's loss, its graph retained).
import sys
import time

import torch

import nllfused

torch.set_num_threads(int(sys.argv[1]))
dt = getattr(torch, sys.argv[2])
N, C = (int(v) for v in sys.argv[3].split("x"))
secs = float(sys.argv[4])
mode = sys.argv[5] if len(sys.argv) > 5 else "fwd"
torch.manual_seed(0)
x = torch.randn(N, C, dtype=dt)
t = torch.randint(0, C, (N,))
if mode in ("fwdbwd", "bwd"):
    x.requires_grad_()
if mode == "bwd":
    loss = nllfused.cross_entropy(x, t)


def f():
    if mode == "stats":
        return nllfused.cross_entropy(x, t, return_stats=True)
    if mode == "bwd":
        return torch.autograd.grad(loss, x, retain_graph=True)
    if mode == "fwdbwd":
        x.grad = None
        nllfused.cross_entropy(x, t).backward()
        return None
    with torch.no_grad():
        return nllfused.cross_entropy(x, t)


f()
ts = []
end = time.time() + secs
while time.time() < end:
    t0 = time.perf_counter()
    f()
    ts.append(time.perf_counter() - t0)
ts.sort()
print(f"{dt} {N}x{C} {mode} threads={torch.get_num_threads()} median {1e3 * ts[len(ts) // 2]:.3f} "
      f"ms min {1e3 * ts[0]:.3f} ms n={len(ts)} {N * C / ts[len(ts) // 2] / 1e9:.2f} Gelem/s")
