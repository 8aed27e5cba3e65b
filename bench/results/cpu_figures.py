import time, torch, torch.nn.functional as F, nllfused
torch.set_num_threads(2)
def t(fn, reps=3):
    fn(); best=[]
    for _ in range(reps):
        s=time.perf_counter(); fn(); best.append(time.perf_counter()-s)
    best.sort(); return best[len(best)//2]
for N, C in ((4096, 32000), (1024, 128256)):
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(N, C, dtype=dt); tg = torch.randint(0, C, (N,)); tg[::10] = -100
        def fb(f):
            xr = x.detach().requires_grad_(); f(xr, tg).backward()
        with torch.no_grad():
            tf_t = t(lambda: F.cross_entropy(x, tg))
            tf_o = t(lambda: nllfused.cross_entropy(x, tg, backend="cpu"))
        tb_t = t(lambda: fb(F.cross_entropy))
        tb_o = t(lambda: fb(lambda a, b: nllfused.cross_entropy(a, b, backend="cpu")))
        print(f"N={N} C={C} {str(dt)[6:]}: "
              f"fwd torch {tf_t*1e3:.0f} ms ours {tf_o*1e3:.0f} ms -> {tf_t/tf_o:.1f}x | "
              f"fwd+bwd torch {tb_t*1e3:.0f} ms ours {tb_o*1e3:.0f} ms -> {tb_t/tb_o:.1f}x",
              flush=True)
