# The LM forward in a loop for perf: python perf_loop.py plain|STAT[,STAT] SECS THREADS (bf16 (4096, 32000)).
import sys, time, torch, nllfused
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
x = torch.randn(4096, 32000, dtype=torch.bfloat16); t = torch.randint(0, 32000, (4096,))
rs = None if sys.argv[1] == "plain" else tuple(sys.argv[1].split(","))
time.sleep(3)
n = 0
t0 = time.time()
with torch.no_grad():
    while time.time() < t0 + float(sys.argv[2]):
        nllfused.cross_entropy(x, t) if rs is None else nllfused.cross_entropy(x, t, return_stats=rs)
        n += 1
print(sys.argv[1], n, "calls", (time.time() - t0) / n * 1e3, "ms")
