"""The static GPU check (nllfused.bench.gpu_static): every kernel compiles for sm_80 and sm_90
with no register spills on the LM path (and none at all in the CUDA kernels), the CUDA kernels
meet issue 15's static targets, the figures are read from the SASS as they should be (a loop
the compiler unrolled counts every copy), and the check itself fails on a broken kernel.

The check runs in a subprocess: this test process runs Triton's interpreter on machines
without a GPU, and the interpreter replaces the compiler the check needs. The subprocess starts
outside the checkout, so that it imports the installed package.
"""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from nllfused.bench import gpu_static  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Two kernels that must make the check fail. In this process they are interpreted functions
# (never run); the subprocess loads this file and gets them compiled.

@triton.jit
def broken_kernel(X, OUT, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    offs = tl.arange(0, BLOCK_C + 1)   # not a power of two: Triton refuses to compile it
    tl.store(OUT + offs, tl.load(X + offs).to(ACC))


@triton.jit
def spilling_kernel(X, OUT, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    # 64 class blocks live at once, carried across the loop: at least 512 values per thread
    # whatever tile launch_config picks for the float32 LM shape (BLOCK_C >= 8 elements per
    # thread), more than the 255 registers a thread can have.
    offs = tl.arange(0, 64 * BLOCK_C)
    acc = tl.zeros([64 * BLOCK_C], ACC)
    for start in range(0, C, 64 * BLOCK_C):
        x = tl.load(X + start + offs, mask=start + offs < C, other=0.0).to(ACC)
        acc = acc * x + x
    tl.store(OUT + offs, acc)


@triton.jit
def unrolled_kernel(X, OUT, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    # A loop unrolled twice (the compiler's choice made explicit): one iteration of the SASS
    # loop handles two class blocks, and elem/it must say so.
    offs = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_C], ACC)
    for start in tl.range(0, C, BLOCK_C, loop_unroll_factor=2):
        acc += tl.exp(tl.load(X + start + offs).to(ACC))
    tl.store(OUT + offs, acc)


def _found(tool):
    try:
        tool()
        return True
    except gpu_static.ToolMissing:
        return False


needs_cuobjdump = pytest.mark.skipif(not _found(gpu_static.cuobjdump),
                                     reason="cuobjdump (Triton's NVIDIA backend) not found")


def run_check(tmp_path, *args):
    """(exit status, JSON report, printed output) of the check in a fresh process."""
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "nllfused.bench.gpu_static", *args,
                           "--json", str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    report = json.loads(out.read_text()) if out.exists() else None
    return proc.returncode, report, proc.stdout + proc.stderr


def check_test_kernels(tmp_path, *names):
    """run_check on kernels of this file, fp32 on sm_90."""
    return run_check(tmp_path, "--kernels", "triton", "--arch", "90", "--scope", "quick",
                     "--dtypes", "fp32", "--kernel-file", f"{__file__}:{','.join(names)}")


@needs_cuobjdump
def test_triton_kernels_compile_without_spills_on_the_lm_path(tmp_path):
    rc, report, output = run_check(tmp_path, "--kernels", "triton", "--arch", "80,90",
                                   "--scope", "quick")
    assert rc == 0, output
    results = report["results"]
    assert {r["arch"] for r in results} == {80, 90}
    assert {r["kernel"] for r in results} >= {"ce_fwd_kernel", "ce_bwd_kernel",
                                              "vp_stats_kernel", "vp_bwd_kernel"}
    lm = [r for r in results if r["lm_path"]]
    assert {r["dtype"] for r in lm} == {"fp32", "bf16"}
    for r in results:
        assert r["error"] is None, r
        assert r["regs"] > 0 and r["sass_per_elem"] > 0, r
    assert all(r["spills"] == 0 for r in lm), [r for r in lm if r["spills"]]
    # Nothing in the float32 / bfloat16 LM hot loop should run in float64.
    assert all(r["f64_in_loop"] == 0 for r in lm), [r for r in lm if r["f64_in_loop"]]
    # Issue 15 on the row kernels' LM path, plain options: <= 10 SASS instructions per logit
    # element in the hot loop, read from the loop (not estimated); registers for >= 4 blocks
    # per sm_90 SM.
    plain = [gpu_static.Report(**r) for r in lm
             if r["plain"] and r["kernel"] in ("ce_fwd_kernel", "ce_bwd_kernel")]
    assert {(r.kernel, r.dtype, r.arch) for r in plain} == {
        (k, d, a) for k in ("ce_fwd_kernel", "ce_bwd_kernel") for d in ("fp32", "bf16")
        for a in (80, 90)}
    for r in plain:
        assert r.sass_per_elem is not None and r.sass_per_elem <= 10, r
        assert not r.elems_estimated, r
        if r.arch == 90:
            assert gpu_static.resident_blocks_sm90(r) >= 4, r


# The hot loops of the forward and the backward for each set of statistics asked for, at the
# statistics' tile (float32, the LM shape, sm_90), compiled outside the interpreter:
# kernel:flags -> SASS instructions in the loop.
STATS_LOOPS = """
import json
from nllfused.bench import gpu_static as g
from nllfused.kernels import cross_entropy as ce
loops = {}
for fn, stats, sets in ((ce.ce_fwd_kernel, "STATS", ((), ("STATS",), ("STATS", "ENTROPY"),
                                                    ("STATS", "ARGMAX"),
                                                    ("STATS", "ENTROPY", "ARGMAX"))),
                        (ce.ce_bwd_kernel, "HAS_STATS_GRAD",
                         ((), ("HAS_STATS_GRAD",), ("HAS_STATS_GRAD", "ENTROPY_GRAD")))):
    off = dict.fromkeys(g.flag_names(fn), False)
    case = g.launched(ce.launch_config, g.cases_for(ce.launch_config, "fp32", "quick")[0],
                      {stats: True}, fn)
    for on in sets:
        r = g.triton_report(fn, 90, case, {**off, **dict.fromkeys(on, True)})
        assert r.error is None, r
        loops[fn.__name__ + ":" + "+".join(on)] = r.loop_instrs
print(json.dumps(loops))
"""


@needs_cuobjdump
def test_statistics_not_asked_for_compile_to_nothing(tmp_path):
    """The kernels carry only the statistics asked for. Forward: the target's log-probability
    alone adds nothing to the class loop, the entropy and the argmax each add their own work,
    and both together more than either. Backward: the target log-prob's gradient alone adds
    nothing to the class loop (it is per row), the entropy's adds its term."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", STATS_LOOPS], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    loops = json.loads(proc.stdout.strip().splitlines()[-1])
    fwd = {k.split(":")[1]: v for k, v in loops.items() if k.startswith("ce_fwd_kernel:")}
    assert fwd["STATS"] == fwd[""], loops
    for one in ("STATS+ENTROPY", "STATS+ARGMAX"):
        assert fwd["STATS"] < fwd[one] < fwd["STATS+ENTROPY+ARGMAX"], loops
    bwd = {k.split(":")[1]: v for k, v in loops.items() if k.startswith("ce_bwd_kernel:")}
    assert bwd["HAS_STATS_GRAD"] == bwd[""] < bwd["HAS_STATS_GRAD+ENTROPY_GRAD"], loops


@needs_cuobjdump
def test_check_fails_on_a_compile_error_and_on_lm_path_spills(tmp_path):
    rc, report, output = check_test_kernels(tmp_path, "broken_kernel", "spilling_kernel")
    assert rc == 1, output
    results = {r["kernel"]: r for r in report["results"]}
    assert set(results) == {"broken_kernel", "spilling_kernel"}
    assert "power of 2" in results["broken_kernel"]["error"]
    spilled = results["spilling_kernel"]
    assert spilled["error"] is None and spilled["lm_path"] and spilled["spills"] > 0, spilled
    assert len(report["failures"]) == 2, report["failures"]
    assert "compile failure: triton broken_kernel" in output
    assert "spills on the LM path" in output


def test_hot_loop_and_float64_are_read_from_sass():
    listing = """
        code for sm_90
                Function : k
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   ISETP.GE.AND P0, PT, R2, 0x1, PT ;
        /*0020*/                   LDG.E.128 R4, [R2.64] ;
        /*0030*/                   FADD R4, R4, R5 ;
        /*0040*/                   DADD R6, R6, R8 ;
        /*0050*/                   F2F.F64.F32 R8, R4 ;
        /*0060*/                   MUFU.EX2 R9, R4 ;
        /*0070*/              @!P0 BRA 0x20 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x90;
    """
    (key, instrs), = gpu_static.parse_sass(listing).items()
    assert key == (90, "k") and len(instrs) == 10
    assert gpu_static.hot_loop(instrs) == (2, 7)   # the trap loop at the end is no data loop
    assert instrs[7].guard == "@!P0" and instrs[7].opcode == "BRA"
    stats = gpu_static.loop_stats(instrs)
    assert stats == dict(instrs=6, f64=2, loads=[128], stores=[], exp_loads=[128])
    assert gpu_static.loop_elements(stats, "bf16") == (8, False)


def test_elements_per_iteration_come_from_the_logits_loads():
    # A forward loop unrolled twice: two 16-byte logits loads whose values reach the exp (one
    # through a bf16 -> f32 conversion, one through a compare and a select into a guarded
    # exp), and a weights load that only multiplies. 2 x 8 bf16 logits per iteration, not 8
    # and not 3 x 8.
    listing = """
        code for sm_90
                Function : f
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.128 R8, desc[UR4][R2.64+0x400] ;
        /*0030*/                   LDG.E.128 R12, desc[UR4][R20.64] ;
        /*0040*/                   IMAD.U32 R16, R7, 0x10000, RZ ;
        /*0050*/                   FADD.FTZ R17, R16, -R30 ;
        /*0060*/                   FMUL.FTZ R12, R12, R17 ;
        /*0070*/                   MUFU.EX2 R18, R17 ;
        /*0080*/                   FSETP.GT.AND P1, PT, R9, R30, PT ;
        /*0090*/                   FSEL R19, R30, R8, !P1 ;
        /*00a0*/                   MOV R16, RZ ;
        /*00b0*/               @P1 MUFU.EX2 R19, R19 ;
        /*00c0*/                   MUFU.EX2 R16, R16 ;
        /*00d0*/                   IADD3 R2, P0, R2, 0x800, RZ ;
        /*00e0*/              @!P0 BRA 0x10 ;
        /*00f0*/                   EXIT ;
    """
    (_, instrs), = gpu_static.parse_sass(listing).items()
    stats = gpu_static.loop_stats(instrs)
    assert stats["loads"] == [128, 128, 128] and stats["exp_loads"] == [128, 128], stats
    assert gpu_static.loop_elements(stats, "bf16") == (16, False)
    assert gpu_static.defs_and_uses(instrs[8]) == ({"P1"}, {"R9", "R30"})   # FSETP P1, PT, ...
    assert gpu_static.defs_and_uses(instrs[1])[0] == {"R4", "R5", "R6", "R7"}
    # A backward loop counts its gradient stores, whatever it loads.
    assert gpu_static.loop_elements(dict(stores=[128, 128], loads=[128] * 4, exp_loads=[]),
                                    "fp32") == (8, False)


def test_cuda_feature_flags_are_named_from_the_header():
    names = gpu_static.cuda_flag_names(REPO)
    assert set(names.values()) >= {"prob", "scale", "cap", "smooth", "weight"}, names
    prob = next(bit for bit, name in names.items() if name == "prob")
    assert gpu_static.describe_flags("0", names) == "-"
    assert gpu_static.describe_flags(str(prob), names) == "prob"
    assert gpu_static.cuda_launch_threads(REPO) == 256


def test_resident_blocks_per_sm_on_sm90():
    report = gpu_static.Report("cuda", "k", 90, "bf16", "-", "-", True, regs=64, smem=320,
                               threads=256)
    assert gpu_static.resident_blocks_sm90(report) == 4      # 65536 / (64 x 256)
    report.regs = 65                                          # rounds up to 72 per thread
    assert gpu_static.resident_blocks_sm90(report) == 3
    report.regs, report.threads = 32, 128
    assert gpu_static.resident_blocks_sm90(report) == 16      # 2048 threads per SM


@needs_cuobjdump
def test_elements_per_iteration_of_an_unrolled_triton_loop(tmp_path):
    rc, report, output = check_test_kernels(tmp_path, "unrolled_kernel")
    assert rc == 0, output
    (r,) = report["results"]
    block_c = int(r["config"].split()[1][1:])   # "R1 C2048 w4 C%16=0"
    assert not r["elems_estimated"] and r["threads"] > 0, r
    assert r["elems_per_iter"] == 2 * block_c / r["threads"], r


def test_ptxas_log_is_parsed():
    log = """ptxas info    : Compiling entry function '_Z1kPf' for 'sm_80'
ptxas info    : Function properties for _Z1kPf
    16 bytes stack frame, 20 bytes spill stores, 28 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 320 bytes smem, 628 bytes cmem[0]
"""
    assert gpu_static.parse_ptxas_log(log) == {
        (80, "_Z1kPf"): dict(regs=64, spill_stores=20, smem=320)}


@pytest.fixture(scope="module")
def cuda_report(tmp_path_factory):
    # nvcc with torch's headers: a few minutes for both architectures, once for both tests.
    rc, report, output = run_check(tmp_path_factory.mktemp("cuda"), "--kernels", "cuda",
                                   "--arch", "80,90", "--root", REPO)
    assert report is not None, output
    return rc, report


@pytest.mark.slow
@needs_cuobjdump
@pytest.mark.skipif(not _found(gpu_static.nvcc_path), reason="nvcc not found (set CUDA_HOME)")
def test_cuda_kernels_compile(cuda_report):
    _, report = cuda_report
    assert {r["arch"] for r in report["results"]} == {80, 90}
    errors = [f for f in report["failures"] if "spills" not in f]
    assert not errors, "\n".join(errors)


@pytest.mark.slow
@needs_cuobjdump
@pytest.mark.skipif(not _found(gpu_static.nvcc_path), reason="nvcc not found (set CUDA_HOME)")
def test_cuda_kernels_do_not_spill(cuda_report):
    rc, report = cuda_report
    assert rc == 0, "\n".join(report["failures"])
    spilled = [r for r in report["results"] if r["spills"]]
    assert not spilled, [(r["kernel"], r["arch"], r["dtype"], r["flags"], r["spills"])
                         for r in spilled]


@pytest.mark.slow
@needs_cuobjdump
@pytest.mark.skipif(not _found(gpu_static.nvcc_path), reason="nvcc not found (set CUDA_HOME)")
def test_cuda_kernels_meet_the_static_targets(cuda_report):
    """Issue 15 on the LM path (rows kernels, float32 / bfloat16, forward and backward, plain
    options): <= 10 SASS instructions per logit element in the hot loop, no float64 there;
    every kernel but the float64 ones: registers for >= 4 blocks of the launcher's largest
    block per sm_90 SM and no float64 in a loop; every kernel <= 96 registers (small C)."""
    _, report = cuda_report
    results = [gpu_static.Report(**r) for r in report["results"]]
    assert all(r.error is None and r.regs for r in results), report["failures"]
    plain = [r for r in results if r.lm_path and r.plain]
    assert {(r.kernel, r.dtype) for r in plain} == {
        (k, d) for k in ("ce_fwd_rows_kernel", "ce_bwd_rows_kernel") for d in ("fp32", "bf16")}
    for r in plain:
        assert r.sass_per_elem is not None and r.sass_per_elem <= 10, r
        assert r.f64_in_loop == 0 and not r.elems_estimated, r
    # (float64 kernels, off the LM path, may take twice the registers: csrc/cuda/ce_kernels.cuh)
    few = [(r.kernel, r.dtype, r.flags, r.regs) for r in results
           if r.arch == 90 and r.dtype != "fp64" and gpu_static.resident_blocks_sm90(r) < 4]
    assert not few, few
    # No float64 instruction in any per-element loop of a kernel with float accumulation,
    # whatever its options (float64 probabilities are rounded to float before the kernel).
    f64 = [(r.kernel, r.arch, r.dtype, r.flags, r.f64_in_loop) for r in results
           if r.dtype != "fp64" and r.f64_in_loop]
    assert not f64, f64
    # Small C (<= 32 classes) runs the same kernels as every C: all of them, float64 ones
    # included, within 96 registers.
    fat = [(r.kernel, r.arch, r.dtype, r.flags, r.regs) for r in results if r.regs > 96]
    assert not fat, fat
