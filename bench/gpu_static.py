"""Static GPU check: compile every kernel for explicit GPU targets and read its machine code.

Needs no GPU: Triton kernels go through Triton's own compiler with an explicit GPUTarget, the
CUDA sources through nvcc; the cubins are then read with cuobjdump. For every compiled kernel it
reports registers, spills, shared memory and the figure the hot-loop work drives down: SASS
instructions per logit element in the loop over class blocks.

    python -m nllfused.bench.gpu_static [--arch 80,90] [--kernels triton,cuda]
        [--scope quick|default|full] [--dtypes fp16,bf16,fp32,fp64] [--json out.json]
        [--only NAME,...] [--kernel-file FILE[:NAME,...]] [--summary-only]
        [--markdown report.md] [--from-json a.json,b.json]

Exit status 1 when a kernel fails to compile or a kernel on the LM path (long rows: BLOCK_R == 1
for Triton, the "rows" mapping for CUDA; float32 / bfloat16 logits) spills registers; 2 when a
tool it needs (triton, nvcc, cuobjdump) is missing. SASS/elem is reported, never enforced here
(tests/test_gpu_static.py holds the CUDA kernels to issue 15's targets).

SASS/elem is the hot loop's instruction count over the logit elements one iteration handles per
thread, counted from the loop's global accesses, so a loop the compiler unrolled counts every
copy: a backward loop's gradient stores, or a forward loop's loads whose values reach an
exponential (register data flow through the loop's branches), not the weights' or targets'
loads. "~" marks a count that could not be read so (Triton: one tile per iteration assumed).
CUDA kernels are named by their feature flags (enum CeFlag in csrc/cuda/ce_thread.cuh; "-" is
the plain kernel). --markdown writes the report that bench/results/static-*.md records: the
issue's targets, then a table per kernel with the resident blocks per SM on sm_90 (the largest
block the launcher uses: num_warps for Triton, kLaunchThreads in csrc/cuda/ce_kernels.cuh).

What is covered (Triton). The launch shapes are those kernels/cross_entropy.launch_config can
return; the constexpr feature flags and the runtime arguments are read from each kernel's
signature, so edits to the kernels need no edit here unless they add an argument no rule below
knows (which is then reported as a compile failure naming the argument).
  quick    float32 and bfloat16; the long-row (LM) shape; flags all off / all on.
  default  every dtype; every shape launch_config gives for many rows (one per BLOCK_C); flags
           all off, each on alone and all on for the long-row shapes (BLOCK_R == 1 or the
           largest BLOCK_C), all off / all on for the others; long rows also with an odd
           vocabulary (rows not 16-byte aligned: no vector loads), short rows also with a
           spatial layout (N, C, D > 1: classes strided) with all flags off.
  full     also the shapes of small batches (BLOCK_R limited by the number of rows), and every
           flag cover on every shape.
A compile takes about a second of CPU: quick is 16 per architecture, default about 650 (half
an hour on two busy cores), full about 14000; nvcc takes a few minutes for both architectures.
Shapes whose loop Triton unrolls away (C == 1 is a constant) report no loop.
Arguments are specialised exactly as the JIT does at a launch (Triton's own binder): 16-byte
aligned pointers, integers equal to 1 become constants, multiples of 16 are marked so.
This module: the Triton cases, the report and the command line; reading SASS and compiling the
CUDA sources: nllfused.bench.gpu_sass.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

from .gpu_sass import (  # noqa: F401 (re-exported: the check's API, used by its tests)
    REPO_ROOT, DTYPE_BITS, LM_DTYPES, SM90, ToolMissing, Report, Instr, parse_sass, hot_loop,
    loop_stats, loop_elements, defs_and_uses, is_f64, parse_res_usage, cuda_home, cuobjdump,
    disassemble, _fill_loop, _last_lines, nvcc_path, nvcc_command, parse_ptxas_log, demangle,
    cuda_flag_names, cuda_launch_threads, describe_flags, describe_cuda_kernel,
    compile_cuda_source, cuda_reports, run_cuda, resident_blocks_sm90)

# --------------------------------------------------------------------------------------------
# Triton: which specialisations to compile
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """A logits problem the launchers might see, with the launch shape they pick for it."""

    dtype: str
    rows: int       # N (rows are N * D)
    classes: int
    spatial: int    # D
    block_r: int
    block_c: int
    num_warps: int
    layout: str     # "C%16=0", "C odd" or "D>1"

    @property
    def label(self) -> str:
        return f"R{self.block_r} C{self.block_c} w{self.num_warps} {self.layout}"


LONG_VOCAB, ODD_VOCAB = 128256, 50257   # a 16-divisible and an odd LM vocabulary


def _elem_size(dtype: str) -> int:
    return DTYPE_BITS[dtype] // 8


def _max_block_c(launch_config, dtype: str) -> int:
    return launch_config(1 << 20, 1 << 24, _elem_size(dtype))[1]


def launch_shapes(launch_config, dtype: str, small_batches: bool) -> dict:
    """{(BLOCK_R, BLOCK_C, num_warps): (rows, classes)}: every distinct output of launch_config
    over class counts 1 .. an LM vocabulary, for many rows (and, with small_batches, for
    4096, 2048 ... 1 rows too)."""
    # Largest first, so each shape's sample is the largest problem giving it: the long-row
    # shape is sampled at an LM vocabulary.
    shapes = {}
    row_counts = [1 << 16] + ([1 << k for k in range(12, -1, -1)] if small_batches else [])
    for rows in row_counts:
        for classes in [LONG_VOCAB] + [1 << k for k in range(16, -1, -1)]:
            shape = launch_config(rows, classes, _elem_size(dtype))
            shapes.setdefault(tuple(shape), (rows, classes))
    return shapes


def is_long_row(case: Case, max_block_c: int) -> bool:
    return case.block_r == 1 or case.block_c == max_block_c


def cases_for(launch_config, dtype: str, scope: str) -> list:
    """The problems compiled for one dtype (see the module docstring for each scope)."""
    if scope == "quick":
        shapes = {tuple(launch_config(1 << 16, LONG_VOCAB, _elem_size(dtype))):
                  (1 << 16, LONG_VOCAB)}
    else:
        shapes = launch_shapes(launch_config, dtype, small_batches=(scope == "full"))
    cases = []
    for (block_r, block_c, warps), (rows, classes) in sorted(shapes.items()):
        cases.append(Case(dtype, rows, classes, 1, block_r, block_c, warps, "C%16=0"))
        if scope == "quick":
            continue
        if block_r == 1:  # an odd vocabulary: rows start unaligned, loads are not vectorised
            odd = ODD_VOCAB if classes == LONG_VOCAB else classes - 1
            cases.append(Case(dtype, rows, odd, 1, block_r, block_c, warps, "C odd"))
        elif block_c >= 2:  # segmentation: (N, C, D) with classes D apart
            cases.append(Case(dtype, 8, classes, 1 << 16, block_r, block_c, warps, "D>1"))
    return cases


def flag_names(fn) -> list:
    """The constexpr parameters that are feature flags: all but the shape and dtype ones."""
    return [p.name for p in fn.params if p.is_constexpr and p.name not in ("BLOCK_R", "BLOCK_C",
                                                                            "ACC")]


def flag_cover(flags: list, full: bool) -> list:
    """All off, each on alone, all on (or, not full: all off and all on): each flag's code is
    compiled alone and together with every other, without the 2^n product."""
    sets = [dict.fromkeys(flags, False)]
    if full:
        sets += [{f: f == g for f in flags} for g in flags]
    if flags:
        sets.append(dict.fromkeys(flags, True))
    unique = []
    for s in sets:
        if s not in unique:
            unique.append(s)
    return unique


def applies(fn, case: Case) -> bool:
    """The vocabulary-parallel kernels take 2-D (R, C) logits only: no spatial layout."""
    has_spatial = any(p.name.startswith("stride_") and p.name.endswith("d") for p in fn.params)
    return case.layout != "D>1" or has_spatial


def launched(launch_config, case: Case, flags: dict, fn=None) -> Case:
    """The case with the tile the launcher picks under these flags: the statistics (STATS in
    the forward, HAS_STATS_GRAD in the backward) take a smaller one for long rows
    (launch_config's docstring), and so does vp_stats_kernel with class weights and smoothing
    (kernels/vocab_parallel.py, _launch)."""
    wide = flags.get("STATS") or flags.get("HAS_STATS_GRAD") or (
        getattr(fn, "__name__", None) == "vp_stats_kernel" and flags.get("HAS_WEIGHT")
        and flags.get("HAS_SMOOTHING"))
    if not wide:
        return case
    block_r, block_c, warps = launch_config(case.rows * case.spatial, case.classes,
                                            _elem_size(case.dtype), stats=True)
    return dataclasses.replace(case, block_r=block_r, block_c=block_c, num_warps=warps)


def launchable(flags: dict) -> dict:
    """The flags as a launcher would set them: the forward's ENTROPY and ARGMAX come only with
    STATS, the backward's ENTROPY_GRAD only with HAS_STATS_GRAD, and rows carrying statistics
    are never split (kernels/cross_entropy.py, _launch)."""
    if "STATS" in flags and not flags["STATS"]:
        flags = {**flags, "ENTROPY": False, "ARGMAX": False}
    if "HAS_STATS_GRAD" in flags and not flags["HAS_STATS_GRAD"]:
        flags = {**flags, "ENTROPY_GRAD": False}
    if flags.get("SPLIT") and (flags.get("STATS") or flags.get("HAS_STATS_GRAD")):
        flags = {**flags, "SPLIT": False}
    return flags


def triton_jobs(kernels: list, launch_config, dtypes: list, scope: str) -> list:
    """(kernel, case, flags) triples to compile, per the scope's covering rules."""
    jobs = []
    for fn in kernels:
        for dtype in dtypes:
            max_block = _max_block_c(launch_config, dtype)
            for case in cases_for(launch_config, dtype, scope):
                if not applies(fn, case):
                    continue
                full = scope == "full" or (scope == "default" and is_long_row(case, max_block)
                                           and case.layout == "C%16=0")
                cover = flag_cover(flag_names(fn), full)
                if case.layout == "D>1" and scope != "full":
                    cover = cover[:1]
                for flags in cover:
                    flags = launchable(flags)
                    job = (fn, launched(launch_config, case, flags, fn), flags)
                    if job not in jobs:
                        jobs.append(job)
    return jobs


# --------------------------------------------------------------------------------------------
# Triton: argument values by name, specialisation, compilation
# --------------------------------------------------------------------------------------------

def _torch_dtype(name: str):
    import torch
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
            "fp64": torch.float64, "i64": torch.int64}[name]


def tensor_dtype(name: str, case: Case, flags: dict) -> str:
    """The dtype of a tensor argument by its role: logits and their gradient in the logits'
    dtype, class-index targets in int64, float64 statistics (lse, its gradient, the weight
    sum, the vocabulary-parallel stats), everything else (per-row losses, weights,
    coefficients, the upstream gradient) in the accumulation dtype."""
    acc = "fp64" if case.dtype == "fp64" else "fp32"
    if name in ("X", "GX"):
        return case.dtype
    if name == "T":
        return case.dtype if flags.get("PROB_TARGET") else "i64"
    if name in ("YL", "PRED"):
        return "i64"
    if name in ("LSE", "GL", "WSUM", "OUT"):
        return "fp64"
    return acc


def stride_value(name: str, case: Case, flags: dict) -> int:
    """stride_<tensor><dim> of contiguous tensors: logits-shaped ones (x, gx, probability
    targets) are (N, C, D), or (R, C) for dim r; per-row ones (upstream gradients, index
    targets) are (N, D), their class stride 0 as the launcher passes it; no dim: 1-D."""
    tensor, dim = name[len("stride_"):], ""
    if len(tensor) > 1 and tensor[-1] in "ncdr":
        tensor, dim = tensor[:-1], tensor[-1]
    C, D = case.classes, case.spatial
    logits_shaped = tensor in ("x", "gx") or (tensor == "t" and flags.get("PROB_TARGET"))
    table = (dict(n=C * D, c=D, d=1, r=C) if logits_shaped else dict(n=D, c=0, d=1, r=1))
    return table.get(dim, 1)


def argument_value(name: str, case: Case, flags: dict):
    """A representative value for a runtime argument, chosen by its name: what a launcher
    passes for `case` (sizes of a typical launch, so int32; tensors as 16-byte aligned as torch
    allocates them). Unknown names raise, so a new argument shows up as a failure."""
    import torch
    sizes = dict(R=case.rows * case.spatial, C=case.classes, D=case.spatial,
                 ignore_index=-100, vocab_start=case.classes)  # a rank > 0 of the group
    if name in sizes:
        return sizes[name]
    if name.isupper():  # tensors are upper case: X, T, W, LSE, GX ...
        return torch.empty(1, dtype=_torch_dtype(tensor_dtype(name, case, flags)))
    if name.startswith("stride_"):
        return stride_value(name, case, flags)
    if name.endswith(("_hi", "_lo")):  # float options travel as float32 halves
        return 0.25
    raise KeyError(f"no rule gives a value for argument {name!r}: extend "
                   f"argument_value in nllfused.bench.gpu_static")


def constexpr_values(fn, case: Case, flags: dict) -> dict:
    import triton.language as tl
    shape = dict(BLOCK_R=case.block_r, BLOCK_C=case.block_c,
                 ACC=tl.float64 if case.dtype == "fp64" else tl.float32)
    return {p.name: shape.get(p.name, flags.get(p.name, False)) for p in fn.params
            if p.is_constexpr}


def specialise(fn, target, case: Case, flags: dict):
    """(options, signature, constexprs, attrs) exactly as the JIT would form them at a launch
    with these arguments: Triton's own binder decides i32/i64, alignment and the ints equal
    to 1 that become constants."""
    from triton import knobs
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    from nllfused.kernels import launch  # the launchers' rule for enable_fp_fusion
    backend = make_backend(target)
    args = [argument_value(p.name, case, flags) for p in fn.params if not p.is_constexpr]
    kwargs = dict(constexpr_values(fn, case, flags), num_warps=case.num_warps,
                  enable_fp_fusion=launch.fp_fusion(flags),
                  debug=bool(getattr(fn, "debug", False)) or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    return fn._pack_args(backend, kwargs, bound, specialization, options)


def compile_triton(fn, arch: int, case: Case, flags: dict):
    """The CompiledKernel for one specialisation; Triton's own prints (it dumps the whole
    PTX when ptxas fails) are swallowed, the exception carries the message."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    target = GPUTarget("cuda", arch, 32)
    with contextlib.redirect_stdout(io.StringIO()):
        options, signature, constexprs, attrs = specialise(fn, target, case, flags)
        return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                              options=options.__dict__)


def measure_cubin(cubin: bytes) -> tuple:
    """(res-usage of the kernel, SASS loop stats) of a single-kernel cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = parse_res_usage(disassemble(f.name, "-res-usage"))
        functions = parse_sass(disassemble(f.name, "-sass"))
    usage = next(iter(usage.values()), {})
    instrs = next(iter(functions.values()), [])
    return usage, loop_stats(instrs)


def triton_report(fn, arch: int, case: Case, flags: dict) -> Report:
    on = [name for name, value in flags.items() if value]
    report = Report("triton", fn.__name__, arch, case.dtype, case.label, "+".join(on) or "-",
                    lm_path=case.block_r == 1 and case.dtype in LM_DTYPES,
                    plain=not on and case.layout == "C%16=0")
    try:
        compiled = compile_triton(fn, arch, case, flags)
        usage, loop = measure_cubin(compiled.asm["cubin"])
    except Exception as exc:  # a compile failure is a result, reported with its message
        report.error = f"{type(exc).__name__}: {_last_lines(str(exc))}"
        return report
    report.regs = usage.get("regs")
    # Triton kernels make no calls and hold no local arrays, so their stack frame and local
    # memory are spilled registers: in 32-bit words, as Triton's n_spills counts them.
    report.spills = (usage.get("stack", 0) + usage.get("local", 0)) // 4
    report.smem = compiled.metadata.shared
    report.threads = compiled.metadata.num_warps * 32
    if loop is not None:
        elems, report.elems_estimated = loop_elements(loop, case.dtype)
        if report.elems_estimated:  # no store, no load feeding an exp: one tile per iteration
            elems = case.block_r * case.block_c / report.threads
        _fill_loop(report, loop, elems)
    return report


def project_kernels() -> list:
    """The module-level @triton.jit kernels (names ending in _kernel) of the package."""
    from nllfused.kernels import cross_entropy, vocab_parallel
    return kernels_in(cross_entropy) + kernels_in(vocab_parallel)


def kernels_in(module, names: Optional[list] = None) -> list:
    from triton.runtime.jit import JITFunction
    found = []
    for name, obj in vars(module).items():
        wanted = name in names if names else name.endswith("_kernel")
        if wanted and getattr(obj, "__module__", None) == module.__name__:
            if not isinstance(obj, JITFunction):
                raise ToolMissing(
                    f"{module.__name__}.{name} is not a JITFunction ({type(obj).__name__}): "
                    f"run without TRITON_INTERPRET=1, the interpreter replaces the compiler")
            found.append(obj)
    missing = set(names or ()) - {k.__name__ for k in found}
    if missing:
        raise ToolMissing(f"no kernel {', '.join(sorted(missing))} in {module.__name__}")
    return found


def load_kernel_file(spec: str) -> list:
    """Kernels from FILE or FILE:NAME,NAME (for checking a kernel before wiring it in)."""
    path, _, names = spec.partition(":") if re.search(r":[\w,]+$", spec) else (spec, "", "")
    module_name = "_gpu_static_" + re.sub(r"\W", "_", os.path.basename(path))
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module  # triton resolves the kernel's globals through it
    loader_spec.loader.exec_module(module)
    return kernels_in(module, names.split(",") if names else None)


def run_triton(kernels: list, archs: list, dtypes: list, scope: str, progress) -> list:
    from nllfused.kernels.cross_entropy import launch_config
    jobs = triton_jobs(kernels, launch_config, dtypes, scope)
    reports = []
    for arch in archs:
        for i, (fn, case, flags) in enumerate(jobs):
            reports.append(triton_report(fn, arch, case, flags))
            progress(f"triton sm_{arch}: {i + 1}/{len(jobs)}")
    return reports


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

_COLUMNS = ("kernel", "arch", "dtype", "config", "flags", "regs", "spills", "smem",
            "loop_instrs", "elems_per_iter", "sass_per_elem", "f64_in_loop")
_HEADINGS = ("kernel", "arch", "dtype", "config", "flags", "regs", "spills", "smem", "loop",
             "elem/it", "SASS/elem", "f64")


def _cell(report: Report, column: str) -> str:
    value = getattr(report, column)
    if column == "arch":
        return f"sm_{value}"
    if column in ("elems_per_iter", "sass_per_elem") and report.elems_estimated:
        return f"~{value}"
    return "-" if value is None else str(value)


def format_rows(headings, rows) -> str:
    widths = [max(len(str(r[i])) for r in [headings, *rows]) for i in range(len(headings))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
                     for r in [headings, *rows])


def table(reports: list) -> str:
    rows = []
    for r in reports:
        mark = " FAIL" if r.failed() else (" lm" if r.lm_path else "")
        rows.append([_cell(r, c) for c in _COLUMNS[:-1]] + [_cell(r, "f64_in_loop") + mark])
    text = format_rows(_HEADINGS, rows)
    errors = [f"  {r.kernel} sm_{r.arch} {r.dtype} {r.config} {r.flags}: {r.error}"
              for r in reports if r.error]
    return text + ("\n\ncompile failures:\n" + "\n".join(errors) if errors else "")


def worst_per_group(reports: list) -> str:
    """Per (kernel, arch, dtype): the worst SASS/elem of the plain kernel on the LM path and the
    worst of all, with the specialisation that has it: the numbers to drive down."""
    groups = {}
    for r in reports:
        if r.sass_per_elem is not None:
            groups.setdefault((r.source, r.kernel, r.arch, r.dtype), []).append(r)
    rows = []
    for (source, kernel, arch, dtype), rs in sorted(groups.items()):
        worst = max(rs, key=lambda r: r.sass_per_elem)
        lm = [r for r in rs if r.lm_path and r.plain]
        lm_worst = _cell(max(lm, key=lambda r: r.sass_per_elem), "sass_per_elem") if lm else "-"
        rows.append([source, kernel, f"sm_{arch}", dtype, lm_worst,
                     _cell(worst, "sass_per_elem"),
                     " ".join(p for p in (worst.config, worst.flags) if p != "-") or "-",
                     str(max(r.regs or 0 for r in rs)), str(max(r.spills or 0 for r in rs))])
    return format_rows(["source", "kernel", "arch", "dtype", "LM plain", "worst SASS/elem",
                        "at", "max regs", "max spills"], rows)


def verdict(reports: list) -> list:
    """The reasons to fail: compile errors anywhere, spills on the LM path."""
    reasons = []
    for r in reports:
        where = f"{r.source} {r.kernel} sm_{r.arch} {r.dtype} {r.config} {r.flags}"
        if r.error:
            reasons.append(f"compile failure: {where}")
        elif r.lm_path and r.spills:
            reasons.append(f"spills on the LM path ({r.spills} words): {where}")
    return reasons


def tool_versions() -> dict:
    versions = {}
    try:
        import triton
        versions["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        out = subprocess.run([nvcc_path(), "--version"], capture_output=True, text=True)
        versions["nvcc"] = out.stdout.strip().splitlines()[-1]
    except (ToolMissing, OSError):
        pass
    return versions


def write_json(path: str, args, reports: list, reasons: list, seconds: float) -> None:
    data = dict(archs=args.arch, kernels=args.kernels, scope=args.scope, dtypes=args.dtypes,
                seconds=round(seconds, 1), versions=tool_versions(), failures=reasons,
                results=[dataclasses.asdict(r) for r in reports])
    with open(path, "w") as f:
        json.dump(data, f, indent=1)




def _block_c(report: Report) -> Optional[int]:
    m = re.search(r"\bC(\d+)\b", report.config)
    return int(m.group(1)) if m else None


def targets(reports: list) -> list:
    """(target, source, holds, detail) for issue 15's static targets, per backend: on the LM
    path (float32 and bfloat16, forward and backward, plain options) <= 10 SASS instructions
    per logit element in the hot loop; no spills (LM path; every CUDA kernel); no float64 in
    the hot loop on the LM path; >= 4 resident blocks per SM on sm_90 for the LM kernels;
    small-C kernels <= 96 registers (Triton: BLOCK_C <= 32; CUDA kernels serve every C). The
    per-logit targets (SASS/elem, blocks per SM) skip the merge kernels, which read no logits."""
    def where(rs):
        return "; ".join(f"{r.kernel} sm_{r.arch} {r.dtype} {r.config} {r.flags}"
                         for r in rs[:4]) + (f"; ... ({len(rs)} in all)" if len(rs) > 4 else "")

    rows = []
    for source in sorted({r.source for r in reports}):
        ok = [r for r in reports if r.source == source and r.error is None]
        lm = [r for r in ok if r.lm_path]
        # Merge kernels (a split row's partial states: ce_fwd_merge_kernel) loop over states,
        # not logits, one program per row: no per-logit or occupancy target for them.
        per_logit = [r for r in lm if "merge" not in r.kernel]
        plain = [r for r in per_logit if r.plain]
        bad = [r for r in plain if r.sass_per_elem is None or r.sass_per_elem > 10]
        worst = max((r.sass_per_elem or 0 for r in plain), default=None)
        rows.append(("<= 10 SASS/elem, LM path, plain options", source, not bad and bool(plain),
                     f"{len(plain)} kernels, worst {worst}" + (f"; over: {where(bad)}" if bad
                                                               else "")))
        scope = ok if source == "cuda" else lm
        spilled = [r for r in scope if r.spills]
        rows.append(("no spills" + (" (every kernel)" if source == "cuda" else " (LM path)"),
                     source, not spilled, where(spilled) if spilled else f"{len(scope)} kernels"))
        f64 = [r for r in lm if r.f64_in_loop]
        f64_plain = [r for r in f64 if r.plain]
        rows.append(("no float64 in the hot loop, LM path", source, not f64,
                     f"{len(lm)} kernels" if not f64 else
                     f"plain options: {where(f64_plain) if f64_plain else 'none'}; "
                     f"with: {where(f64)}"))
        lm90 = [r for r in per_logit if r.arch == 90]
        few = [r for r in lm90 if (resident_blocks_sm90(r) or 0) < 4]
        least = min((resident_blocks_sm90(r) or 0 for r in lm90), default=None)
        rows.append((">= 4 resident blocks per SM on sm_90, LM path", source,
                     not few and bool(lm90),
                     where(few) if few else f"{len(lm90)} kernels, min {least}"))
        small = ([r for r in ok if (_block_c(r) or 1 << 30) <= 32] if source == "triton"
                 else ok)
        fat = [r for r in small if (r.regs or 0) > 96]
        most = max((r.regs or 0 for r in small), default=None)
        rows.append(("small C <= 96 registers", source, not fat,
                     where(fat) if fat else f"{len(small)} kernels, max {most} registers"))
    return rows


def markdown(reports: list, command: str, versions: dict, commit: str) -> str:
    """The static report as Markdown: how it was made, the targets, a table per kernel."""
    lines = ["# Static GPU report (no GPU)", "",
             "Every kernel compiled for the listed architectures without running it: registers "
             "and spills from the compiler (ptxas), SASS read with cuobjdump. SASS/elem = "
             "instructions of the hot loop / logit elements one iteration handles per thread "
             "(from the loop's global loads and stores); blk/SM = resident blocks per SM on "
             "sm_90 for the largest block launched (registers, threads, shared memory). "
             "Nothing here was measured on a GPU.", "",
             f"- commit: {commit}",
             *[f"- {tool}: {version}" for tool, version in sorted(versions.items())],
             f"- regenerate: `{command}`", "", "## Targets (issue 15)", "",
             "| target | backend | holds | detail |", "|---|---|---|---|"]
    for name, source, holds, detail in targets(reports):
        lines.append(f"| {name} | {source} | {'yes' if holds else 'NO'} | {detail} |")
    groups = {}
    for r in reports:
        groups.setdefault((r.source, r.kernel), []).append(r)
    for (source, kernel), rs in sorted(groups.items()):
        lines += ["", f"## {source}: {kernel}", "",
                  "| arch | dtype | config | flags | regs | spills | smem | SASS/elem | loop | "
                  "elem/it | f64 | blk/SM sm_90 | LM |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            blocks = resident_blocks_sm90(r)
            if r.error:
                lines.append(f"| sm_{r.arch} | {r.dtype} | {r.config} | {r.flags} | "
                             f"compile failure: {r.error[:120]} |" + " |" * 8)
                continue
            lines.append("| " + " | ".join([
                f"sm_{r.arch}", r.dtype, r.config, r.flags, _cell(r, "regs"), _cell(r, "spills"),
                _cell(r, "smem"), _cell(r, "sass_per_elem"), _cell(r, "loop_instrs"),
                _cell(r, "elems_per_iter"), _cell(r, "f64_in_loop"),
                "-" if blocks is None else str(blocks),
                ("plain" if r.plain else "yes") if r.lm_path else ""]) + " |")
    return "\n".join(lines) + "\n"


def git_commit(root: str) -> str:
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "csrc/cuda",
                                "kernels"], capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes to the kernels)" if dirty else "")
    except OSError:
        return "?"


def load_json(paths: list) -> tuple:
    """(reports, the arguments that would compile them again) from the files --json wrote (one
    per run; runs of both backends may be merged)."""
    fields = {f.name for f in dataclasses.fields(Report)}
    reports, kernels, archs, scope = [], [], [], "default"
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        reports += [Report(**{k: v for k, v in r.items() if k in fields})
                    for r in data["results"]]
        kernels += [k for k in data["kernels"] if k not in kernels]
        archs += [a for a in data["archs"] if a not in archs]
        scope = data["scope"] if "triton" in data["kernels"] else scope
    args = f"--kernels {','.join(kernels)} --arch {','.join(map(str, sorted(archs)))}"
    return reports, args + ("" if scope == "default" else f" --scope {scope}")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _csv(text: str) -> list:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m nllfused.bench.gpu_static",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=lambda s: [int(a) for a in _csv(s)], default=[80, 90],
                   help="compute capabilities, e.g. 80,90 (default)")
    p.add_argument("--kernels", type=_csv, default=["triton", "cuda"],
                   help="triton, cuda or both (default)")
    p.add_argument("--scope", choices=("quick", "default", "full"), default="default",
                   help="how many Triton specialisations (see the module docstring)")
    p.add_argument("--dtypes", type=_csv, default=None,
                   help="logits dtypes for the Triton kernels (default: fp32,bf16 for "
                        "--scope quick, else all four)")
    p.add_argument("--kernel-file", action="append", default=[],
                   help="check the @triton.jit kernels of FILE[:NAME,...] instead of the "
                        "package's (names ending in _kernel by default)")
    p.add_argument("--only", type=_csv, default=None,
                   help="only the Triton kernels with these names, e.g. ce_fwd_kernel")
    p.add_argument("--root", default=REPO_ROOT, help="source tree holding csrc/cuda")
    p.add_argument("--json", help="write every result to this file")
    p.add_argument("--summary-only", action="store_true", help="only the worst-per-group table")
    p.add_argument("--markdown", help="write the report as Markdown (targets, a table per "
                                      "kernel, resident blocks per SM on sm_90) to this file")
    p.add_argument("--from-json", type=_csv, default=None,
                   help="read the results of earlier --json runs (comma-separated files) "
                        "instead of compiling")
    args = p.parse_args(argv)
    if args.dtypes is None:
        args.dtypes = list(LM_DTYPES) if args.scope == "quick" else list(DTYPE_BITS)
    for option, given, known in (("dtypes", args.dtypes, list(DTYPE_BITS)),
                                 ("kernels", args.kernels, ["triton", "cuda"])):
        if not given or set(given) - set(known):
            p.error(f"--{option} {','.join(given)}: choose from {','.join(known)}")
    return args


def _progress(message: str, _state={"last": 0.0}) -> None:
    # Long runs say where they are every few seconds, on stderr, so the table stays clean.
    now = time.monotonic()
    if now - _state["last"] > 5:
        _state["last"] = now
        print(message, file=sys.stderr, flush=True)


def collect(args) -> list:
    reports = []
    if "triton" in args.kernels:
        kernels = ([k for spec in args.kernel_file for k in load_kernel_file(spec)]
                   if args.kernel_file else project_kernels())
        if args.only:
            kernels = [k for k in kernels if k.__name__ in args.only]
        if not kernels:
            raise ToolMissing("no Triton kernel to check (see --only / --kernel-file)")
        reports += run_triton(kernels, args.arch, args.dtypes, args.scope, _progress)
    if "cuda" in args.kernels and not args.kernel_file:
        reports += run_cuda(args.arch, args.root, _progress)
    return reports


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    try:
        if args.from_json:
            reports, compile_args = load_json(args.from_json)
        else:
            reports, compile_args = collect(args), " ".join(
                a for a in (argv if argv is not None else sys.argv[1:]))
    except (ToolMissing, ImportError) as exc:
        print(f"gpu_static: cannot run: {exc}", file=sys.stderr)
        return 2
    reasons = verdict(reports)
    if not args.summary_only:
        print(table(reports) + "\n")
    print(worst_per_group(reports))
    seconds = time.monotonic() - start
    done = (f"read from {','.join(args.from_json)}" if args.from_json
            else f"compiled in {seconds:.0f} s")
    print(f"\n{len(reports)} kernels {done}; "
          + (f"FAILED ({len(reasons)}):\n  " + "\n  ".join(reasons) if reasons else "ok"))
    if args.json:
        write_json(args.json, args, reports, reasons, seconds)
    if args.markdown:
        command = (f"python -m nllfused.bench.gpu_static {compile_args}".split(" --markdown")[0]
                   + f" --markdown {args.markdown}")
        with open(args.markdown, "w") as f:
            f.write(markdown(reports, command, tool_versions(), git_commit(args.root)))
    return 1 if reasons else 0


if __name__ == "__main__":
    sys.exit(main())

