# Two builds of nllfused timed in alternating processes (the order flipped every round), 2 threads:
#   python ab_builds.py ROUNDS MODE "NxC:dtype;..." OLD_DIR NEW_DIR
# MODE f: forward under no_grad; fb: forward+backward. Each process: per shape, the median of
# ~200 MB worth of calls after one warm-up; printed: min-max and median over the rounds.
# OLD_DIR / NEW_DIR: checkouts built in place (setup.py build_ext --inplace), e.g. the parent
# commit's tracked files copied to a folder and built there.
import os, subprocess, sys, json, statistics
CHILD = r'''
import sys, time, json, statistics, torch
sys.path.insert(0, sys.argv[1])
import nllfused
torch.set_num_threads(2)
mode = sys.argv[2]; out = {}
for spec in sys.argv[3].split(";"):
    shp, dt = spec.split(":")
    N, C = map(int, shp.split("x")); dt = getattr(torch, dt)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(N, C, generator=g) * 2).to(dt); t = torch.randint(0, C, (N,), generator=g)
    reps = max(3, int(2e8 / (N * C * x.element_size())))
    ts = []
    for i in range(reps + 1):
        if mode == "f":
            with torch.no_grad():
                t0 = time.perf_counter(); nllfused.cross_entropy(x, t); dt_ = time.perf_counter() - t0
        else:
            xx = x.detach().requires_grad_()
            t0 = time.perf_counter(); nllfused.cross_entropy(xx, t).backward(); dt_ = time.perf_counter() - t0
        if i: ts.append(dt_)
    out[spec] = statistics.median(ts) * 1e3
print(json.dumps(out))
'''
rounds, mode, specs = int(sys.argv[1]), sys.argv[2], sys.argv[3]
variants = [("old", sys.argv[4]), ("new", sys.argv[5])]
acc = {}
for r in range(rounds):
    for name, path in (variants if r % 2 == 0 else variants[::-1]):
        o = subprocess.run([sys.executable, "-c", CHILD, path, mode, specs], capture_output=True, text=True, cwd="/tmp")
        if o.returncode: print(o.stderr[-2000:]); sys.exit(1)
        for k, v in json.loads(o.stdout.strip().splitlines()[-1]).items(): acc.setdefault((k, name), []).append(v)
for spec in specs.split(";"):
    o, n = acc[(spec, "old")], acc[(spec, "new")]
    print(f"{mode} {spec:22s} old {min(o):7.2f}-{max(o):7.2f} (med {statistics.median(o):7.2f})  new {min(n):7.2f}-{max(n):7.2f} (med {statistics.median(n):7.2f})  new/old {statistics.median(n)/statistics.median(o):.3f}", flush=True)
