import time, torch, torch.nn.functional as F, nllfused
from nllfused.bench.memory import peak_bytes_above_current
torch.set_num_threads(2)
N, H, C = 2048, 1024, 32000
x = torch.randn(N, H) * 0.5
W = torch.randn(C, H) * 0.02
t = torch.randint(0, C, (N,))
t[::10] = -100
def step(fn):
    xr = x.detach().requires_grad_(); Wr = W.detach().requires_grad_()
    fn(xr, Wr).backward()
    return xr.grad, Wr.grad
torch_fn = lambda a, b: F.cross_entropy(F.linear(a, b), t)
ours_fn = lambda a, b: nllfused.linear_cross_entropy(a, b, t, backend="cpu")
res = {}
for name, fn in (("torch", torch_fn), ("nllfused-cpu", ours_fn)):
    mem = peak_bytes_above_current(lambda: step(fn), torch.device("cpu"))
    step(fn); ts = []
    for _ in range(3):
        s = time.perf_counter(); step(fn); ts.append(time.perf_counter() - s)
    ts.sort(); res[name] = (mem, ts[1])
    print(f"{name}: peak above inputs {mem/2**20:.1f} MiB (grads included), "
          f"fwd+bwd {ts[1]*1e3:.0f} ms", flush=True)
ours, ref = res["nllfused-cpu"], res["torch"]
print(f"memory ratio {ours[0]/ref[0]:.3f}, time ratio {ours[1]/ref[1]:.2f}")
