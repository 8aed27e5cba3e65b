"""The statistics' cost in the Triton kernels' hot loops, read from their SASS (no GPU):
`python bench/results/static-stats-2026-12-02/stats_loops.py` from the repository root, with
nllfused installed and TRITON_INTERPRET unset. Prints, for float32 and bfloat16 at the LM shape's
statistics tile on sm_90, the SASS instructions of the class loop and per logit element for each
set of statistics flags (nllfused.bench.gpu_static compiles them)."""
from nllfused.bench import gpu_static as g
from nllfused.kernels import cross_entropy as ce

SETS = {ce.ce_fwd_kernel: ("STATS", [(), ("STATS",), ("STATS", "ARGMAX"), ("STATS", "ENTROPY"),
                                     ("STATS", "ENTROPY", "ARGMAX")]),
        ce.ce_bwd_kernel: ("HAS_STATS_GRAD", [(), ("HAS_STATS_GRAD",),
                                              ("HAS_STATS_GRAD", "ENTROPY_GRAD")])}

print("| kernel | dtype | tile | flags | regs | loop SASS | SASS/elem |")
print("|---|---|---|---|---|---|---|")
for fn, (stats, sets) in SETS.items():
    off = dict.fromkeys(g.flag_names(fn), False)
    for dtype in ("fp32", "bf16"):
        lm = g.cases_for(ce.launch_config, dtype, "quick")[0]
        plain = g.triton_report(fn, 90, lm, off)
        print(f"| {fn.__name__} | {dtype} | {lm.label} (plain tile) | - | {plain.regs} | "
              f"{plain.loop_instrs} | {plain.sass_per_elem} |")
        case = g.launched(ce.launch_config, lm, {stats: True}, fn)
        for on in sets:
            r = g.triton_report(fn, 90, case, {**off, **dict.fromkeys(on, True)})
            print(f"| {fn.__name__} | {dtype} | {case.label} | {'+'.join(on) or '-'} | {r.regs} | "
                  f"{r.loop_instrs} | {r.sass_per_elem} |")
