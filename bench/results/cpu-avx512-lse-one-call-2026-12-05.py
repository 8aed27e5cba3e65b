"""return_lse / return_z_loss: the one-call route against the general path and torch's nearest
equivalent, one thread, paired in one process (cpu-avx512-lse-one-call-2026-12-05.md)."""
import os, sys, time, statistics, torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import nllfused, nllfused.functional as Fn
torch.set_num_threads(1)
orig = Fn._one_call_cpu
def run(shape, grad):
    N, C = shape
    x = torch.randn(N, C).requires_grad_(grad); t = torch.randint(0, C, (N,))
    def ours(**kw):
        out = nllfused.cross_entropy(x, t, **kw)
        if grad: out[0].backward()
    def gen(**kw):
        Fn._one_call_cpu = lambda *a: None
        try: ours(**kw)
        finally: Fn._one_call_cpu = orig
    def tref():
        loss = torch.nn.functional.cross_entropy(x, t); lse = torch.logsumexp(x.detach(), 1)
        if grad: loss.backward()
    both = dict(return_lse=True, return_z_loss=True)
    V = {"torch ce+logsumexp": tref,
         "lse one-call": lambda: ours(return_lse=True),
         "lse general": lambda: gen(return_lse=True),
         "z+lse one-call": lambda: ours(**both),
         "z+lse general": lambda: gen(**both)}
    res = {k: [] for k in V}
    reps = 2000 if N * C < 10000 else 50
    for _ in range(reps):
        for k, f in V.items():
            t0 = time.perf_counter()
            f()
            res[k].append(time.perf_counter() - t0)
    print(shape, "fwd+bwd" if grad else "fwd",
          {k: round(statistics.median(v) * 1e6, 1) for k, v in res.items()}, flush=True)
for shape in [(64, 10), (4096, 1000)]:
    for grad in (False, True): run(shape, grad)
