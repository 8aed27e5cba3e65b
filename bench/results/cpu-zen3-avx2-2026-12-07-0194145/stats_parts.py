# usage: python stats_parts.py THREADS [DTYPE] [ROUNDS]: (4096, 32000) forward with each statistic alone vs the plain loss.
# Time the bf16 LM forward with each statistic alone, paired in one process, rounds rotated.
import sys, time, torch, nllfused
torch.set_num_threads(int(sys.argv[1]))
N, C = 4096, 32000
dt = getattr(torch, sys.argv[2]) if len(sys.argv) > 2 else torch.bfloat16
torch.manual_seed(0)
x = torch.randn(N, C, dtype=dt); t = torch.randint(0, C, (N,))
cfg = {"plain": None, "lse": ("lse",), "tlp": ("target_logprob",), "ent": ("entropy",),
       "pred": ("predicted",), "all": True}
def call(rs):
    with torch.no_grad():
        if rs is None: return nllfused.cross_entropy(x, t)
        return nllfused.cross_entropy(x, t, return_stats=rs)
res = {k: [] for k in cfg}
names = list(cfg)
for rnd in range(int(sys.argv[3]) if len(sys.argv) > 3 else 6):
    for k in names[rnd % len(names):] + names[:rnd % len(names)]:
        call(cfg[k])
        ts = []
        for _ in range(8):
            t0 = time.perf_counter(); call(cfg[k]); ts.append(time.perf_counter() - t0)
        res[k].append(min(ts))
import statistics as st
base = statistics_base = st.mean(res["plain"])
for k in names:
    m = st.mean(res[k]); print(f"{k:6s} mean-of-min {1e3*m:8.2f} ms  vs plain {base/m:.3f}x")
