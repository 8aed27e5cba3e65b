"""Compiled GPU code, read without a GPU (the machinery of nllfused.bench.gpu_static): the
report record, cuobjdump's SASS listing parsed (the hot loop, its float64 instructions, the logit
elements one iteration handles), resident blocks per SM, and the CUDA sources compiled by nvcc
with ptxas -v and read the same way. See gpu_static's docstring for what the figures mean."""
from __future__ import annotations

import bisect
import glob
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
from dataclasses import dataclass
from typing import Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPE_BITS = {"fp16": 16, "bf16": 16, "fp32": 32, "fp64": 64}
LM_DTYPES = ("fp32", "bf16")  # the dtypes LM training runs in: a spill there fails the check


class ToolMissing(RuntimeError):
    """A compiler or disassembler the check needs is not installed."""


@dataclass
class Report:
    """One compiled kernel (one specialisation, one architecture)."""

    source: str                    # "triton" or "cuda"
    kernel: str
    arch: int
    dtype: str                     # logits dtype
    config: str                    # launch shape / template arguments
    flags: str                     # constexpr flags that are on ("-": none)
    lm_path: bool
    plain: bool = False            # the default form: no flag on, aligned rows (Triton) /
                                   # int64 index targets (CUDA)
    regs: Optional[int] = None
    spills: Optional[int] = None   # 32-bit words of spilled registers
    smem: Optional[int] = None     # bytes of shared memory
    loop_instrs: Optional[int] = None
    elems_per_iter: Optional[float] = None   # logit elements one loop iteration handles per thread
    elems_estimated: bool = False            # elems_per_iter guessed, not read from the loop
    threads: Optional[int] = None            # threads of the largest block launched
    sass_per_elem: Optional[float] = None
    f64_in_loop: Optional[int] = None
    error: Optional[str] = None

    def failed(self) -> bool:
        return self.error is not None or (self.lm_path and bool(self.spills))


# --------------------------------------------------------------------------------------------
# SASS: parsing cuobjdump's listing, finding the hot loop
# --------------------------------------------------------------------------------------------

@dataclass
class Instr:
    addr: int
    opcode: str        # with modifiers, e.g. LDG.E.128
    operands: str
    guard: str = ""    # the predicate guard (@P0, @!P1), "" when the instruction always runs

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PRED = re.compile(r"^@!?U?P[T0-9]+\s+")
_ARCH = re.compile(r"code for (sm_\d+)")
_FUNC = re.compile(r"Function\s*:\s*(\S+)")


def parse_sass(text: str) -> dict:
    """{(arch, function name): [Instr]} from `cuobjdump -sass` output (any number of each)."""
    functions, arch, current = {}, 0, None
    for line in text.splitlines():
        if m := _ARCH.search(line):
            arch = int(re.sub(r"\D", "", m.group(1)))
        elif m := _FUNC.search(line):
            current = functions.setdefault((arch, m.group(1)), [])
        elif current is not None and (m := _INSTR.match(line)):
            guard = _PRED.match(m.group(2))
            body = _PRED.sub("", m.group(2))
            opcode, _, operands = body.partition(" ")
            current.append(Instr(int(m.group(1), 16), opcode, operands.strip(),
                                 guard.group(0).strip() if guard else ""))
    return functions


def _branch_target(instr: Instr) -> Optional[int]:
    if instr.base != "BRA":
        return None
    m = re.search(r"0x([0-9a-f]+)\s*$", instr.operands)
    return int(m.group(1), 16) if m else None


def find_loops(instrs: list) -> list:
    """Loops as (first, last) instruction indices: a branch back to an earlier address closes
    the loop starting there; several back edges to one header make one loop."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    last_of = {}
    for i, ins in enumerate(instrs):
        target = _branch_target(ins)
        if target is not None and target <= ins.addr and target in index:
            head = index[target]
            last_of[head] = max(last_of.get(head, i), i)
    return sorted(last_of.items())


def hot_loop(instrs: list) -> Optional[tuple]:
    """The largest innermost loop that reads global memory: the loop over class blocks in a
    Triton kernel, the vectorised class loop inside the row loop of a CUDA kernel. Loops of a
    couple of instructions (the trap loop after EXIT, spin loops) are not loops over data, nor
    are loops that load nothing (the compiler may close the after-loop reductions of a Triton
    kernel, their shuffles and barriers, into one); where no loop loads, the largest. Where
    loops also store (a backward's gradient loop), those: a loop that only reads beside one that
    writes is a pass for rare rows (the backward's rereading of rows far from zero, _exact_lse)."""
    loops = [(a, b) for a, b in find_loops(instrs) if b - a >= 4]

    def contains_another(outer):
        return any(o != outer and outer[0] <= o[0] and o[1] <= outer[1] for o in loops)

    def has(lp, bases):
        return any(ins.base in bases for ins in instrs[lp[0]:lp[1] + 1])

    innermost = [lp for lp in loops if not contains_another(lp)]
    reading = [lp for lp in innermost if has(lp, ("LDG", "LD"))] or innermost
    writing = [lp for lp in reading if has(lp, ("STG", "ST"))] or reading
    return max(writing, key=lambda lp: lp[1] - lp[0], default=None)


_F64_OPS = {"DADD", "DMUL", "DFMA", "DSETP", "DSET", "DMNMX", "DMMA"}
_F64_CONVERSIONS = {"F2F", "I2F", "F2I", "FRND", "I2FP", "F2IP"}


def is_f64(instr: Instr) -> bool:
    """float64 arithmetic, conversions to or from float64, MUFU's float64 approximations."""
    if instr.base in _F64_OPS:
        return True
    modifiers = instr.opcode.split(".")[1:]
    if instr.base in _F64_CONVERSIONS and "F64" in modifiers:
        return True
    return instr.base == "MUFU" and any(m.endswith("64H") for m in modifiers)


def access_bits(instr: Instr) -> int:
    """Width of a global load/store in bits: LDG.E.128 -> 128, LDG.E.U16 -> 16, LDG.E -> 32."""
    for m in instr.opcode.split(".")[1:]:
        digits = re.fullmatch(r"[US]?(8|16|32|64|128|256)", m)
        if digits:
            return int(digits.group(1))
    return 32


# Instructions that write no register (stores, branches, barriers, ...).
_NO_DEST = {"STG", "STS", "STL", "ST", "RED", "REDG", "BRA", "BRX", "JMP", "JMX", "EXIT", "RET",
            "CALL", "BAR", "BSSY", "BSYNC", "WARPSYNC", "NOP", "MEMBAR", "YIELD", "DEPBAR",
            "ERRBAR", "CCTL", "KILL", "BPT", "FENCE"}
_REGISTER = re.compile(r"\b(U?R|U?P)(\d+|Z|T)(\.64)?\b")
_PREDICATE = re.compile(r"^!?U?P(\d+|T)$")


def _registers(text: str, wide: bool) -> set:
    """The registers an operand names (RZ/PT and friends excluded); a .64 pair or, in a 64-bit
    instruction, every register counts with its successor."""
    found = set()
    for kind, num, pair in _REGISTER.findall(text):
        if num in ("Z", "T"):
            continue
        found.add(f"{kind}{num}")
        if kind.endswith("R") and (pair or wide):
            found.add(f"{kind}{int(num) + 1}")
    return found


def _dest_width(ins: Instr) -> int:
    """How many consecutive registers the first destination spans."""
    mods = ins.opcode.split(".")[1:]
    if ins.base.startswith("LD"):
        return max(1, access_bits(ins) // 32)
    if ins.base in ("DADD", "DMUL", "DFMA", "DMNMX") or "WIDE" in mods:
        return 2
    if ins.base in _F64_CONVERSIONS and mods and mods[0] == "F64":
        return 2
    return 1


def defs_and_uses(ins: Instr) -> tuple:
    """(registers written, registers read) of one instruction. Destinations come first in
    SASS: the first operand, and the predicates right after it (carry-outs, the second
    predicate of a SETP); a memory operand ([...]) is always read."""
    operands = [o.strip() for o in ins.operands.split(",") if o.strip()]
    wide = ins.base.startswith("D") or "64" in ins.opcode.split(".")[1:]
    defs, uses = set(), set()
    start = 0
    if ins.base not in _NO_DEST and operands and "[" not in operands[0]:
        first = _registers(operands[0], False)
        if first:
            kind, num = re.match(r"(U?[RP])(\d+)", sorted(first)[0]).groups()
            defs = {f"{kind}{int(num) + i}" for i in range(_dest_width(ins))} if kind.endswith(
                "R") else first
        start = 1
        while start < len(operands) and _PREDICATE.match(operands[start]):
            defs |= _registers(operands[start], False)
            start += 1
    for operand in operands[start:]:
        uses |= _registers(operand, wide)
    return defs, uses


def _successors(body: list) -> list:
    """For each instruction of a loop body, the indices it may pass control to within the loop:
    the next one unless it is an unconditional branch or exit, and a branch's target (a target
    at the loop's first address is the back edge; targets outside the loop leave it)."""
    addrs = [ins.addr for ins in body]
    succ = []
    for i, ins in enumerate(body):
        nxt = [] if (ins.base in ("BRA", "EXIT", "RET") and not ins.guard) else [i + 1]
        target = _branch_target(ins)
        if target is not None and addrs[0] <= target <= addrs[-1]:
            nxt.append(bisect.bisect_left(addrs, target))   # (NOPs are not in the body)
        succ.append([j for j in nxt if j < len(body)])
    return succ


def _is_exp(ins: Instr) -> bool:
    return ins.base == "MUFU" and "EX2" in ins.opcode.split(".")


def feeds_exp(body: list, index: int, succ: Optional[list] = None) -> bool:
    """Whether the value loaded by body[index] reaches an exponential (MUFU.EX2) within the
    loop: register data flow over the loop's control flow (branches inside the loop, the back
    edge), iterated to a fixed point, so that a register holding the loaded value on one path
    does not taint a read on a path the value never takes. An instruction under a guard is
    taken to run: where it does not, its register keeps an older value that the compiler's
    if-converted code never uses (an exp of it, say, whose sum is guarded too). Predicates
    carry no taint: a comparison that only selects (a target's zero mass choosing which value
    goes on, say) does not make its operand an input of the exponential. Nor does the
    register a byte permute (PRMT) writes into and keeps bytes of: a 16-bit conversion's
    partial write, whose other bytes the next instruction shifts out."""
    succ = succ if succ is not None else _successors(body)
    rw = []
    for ins in body:
        defs, uses = ({x for x in regs if "R" in x} for regs in defs_and_uses(ins))
        if ins.base == "PRMT":
            uses -= defs & _registers(ins.operands.split(",")[-1], False)
        rw.append((defs, uses))
    tainted_in = [None] * len(body)   # registers that may hold the loaded value on entry
    tainted_in[index] = frozenset()
    work = [index]
    while work:
        i = work.pop()
        tainted = set(tainted_in[i])
        defs, uses = rw[i]
        if i == index or uses & tainted:
            if i != index and _is_exp(body[i]):
                return True
            tainted |= defs
        else:
            tainted -= defs
        out = frozenset(tainted)
        for j in succ[i]:
            if tainted_in[j] is None or not out <= tainted_in[j]:
                tainted_in[j] = out if tainted_in[j] is None else tainted_in[j] | out
                work.append(j)
    return False


def loop_stats(instrs: list) -> Optional[dict]:
    """Size, float64 count and global memory accesses of the hot loop; None without a loop.
    exp_loads: the widths of the loads whose values reach an exponential: the logits."""
    loop = hot_loop(instrs)
    if loop is None:
        return None
    body = [ins for ins in instrs[loop[0]:loop[1] + 1] if ins.base != "NOP"]
    succ = _successors(body)
    return dict(instrs=len(body), f64=sum(map(is_f64, body)),
                loads=[access_bits(i) for i in body if i.base == "LDG"],
                stores=[access_bits(i) for i in body if i.base == "STG"],
                exp_loads=[access_bits(i) for k, i in enumerate(body)
                           if i.base == "LDG" and feeds_exp(body, k, succ)])


def loop_elements(loop: dict, dtype: str) -> tuple:
    """(logit elements one iteration of the hot loop handles per thread, whether that is an
    estimate), from the widths of the loop's global accesses, so that a loop the compiler
    unrolled counts every copy: a backward loop stores one gradient element (the logits'
    dtype) per logit; a forward loop reads the logits with the loads whose values reach an
    exponential (the online softmax's exp), not the weights' or targets'. Without either,
    the loads of the logits' width are counted: an estimate."""
    bits = DTYPE_BITS.get(dtype)
    if not bits:
        return None, True
    if loop["stores"]:
        return sum(loop["stores"]) / bits, False
    if loop.get("exp_loads"):
        return sum(loop["exp_loads"]) / bits, False
    return sum(1 for b in loop["loads"] if b == bits) or None, True


_RES_USAGE = re.compile(
    r"Function ([^:\s]+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def parse_res_usage(text: str) -> dict:
    """{function: dict(regs, stack, shared, local)} from `cuobjdump -res-usage`."""
    return {m.group(1): dict(regs=int(m.group(2)), stack=int(m.group(3)),
                             shared=int(m.group(4)), local=int(m.group(5)))
            for m in _RES_USAGE.finditer(text)}


def cuda_home() -> str:
    return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"


def cuobjdump() -> str:
    """Triton's copy (its NVIDIA backend ships one), else the CUDA toolkit's."""
    candidates = []
    try:
        from triton import knobs
        candidates.append(knobs.nvidia.cuobjdump.path)
    except Exception:  # no triton, or a triton without NVIDIA binaries: look elsewhere
        pass
    candidates += [shutil.which("cuobjdump"), os.path.join(cuda_home(), "bin", "cuobjdump")]
    for path in candidates:
        if path and os.path.exists(path):
            return path
    raise ToolMissing("cuobjdump not found (it ships with Triton's NVIDIA backend and CUDA)")


def disassemble(binary_path: str, what: str) -> str:
    """cuobjdump -sass / -res-usage of a cubin or fatbin."""
    out = subprocess.run([cuobjdump(), what, binary_path], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"cuobjdump {what} failed: {out.stderr.strip()}")
    return out.stdout


def _fill_loop(report: Report, loop: Optional[dict], elems: Optional[float]) -> None:
    if loop is None:
        return
    report.loop_instrs, report.f64_in_loop = loop["instrs"], loop["f64"]
    if elems:
        report.elems_per_iter = round(elems, 3)
        report.sass_per_elem = round(loop["instrs"] / elems, 2)


def _last_lines(text: str, n: int = 6) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[:600]

# sm_90 (H100 / H200) per SM: registers, threads, blocks, shared memory (227 KiB usable, and
# 1 KiB the runtime reserves per block); registers are allocated per warp in units of 256.
SM90 = dict(regs=65536, threads=2048, blocks=32, smem=232448, smem_per_block=1024)


def resident_blocks_sm90(report: Report) -> Optional[int]:
    """Blocks of report.threads threads that fit on one sm_90 SM at once (registers, threads,
    shared memory), or None when a figure is missing."""
    if not report.regs or not report.threads:
        return None
    warps = -(-report.threads // 32)
    regs_per_warp = -(-report.regs * 32 // 256) * 256
    limits = [SM90["blocks"], SM90["threads"] // (warps * 32),
              SM90["regs"] // (warps * regs_per_warp)]
    if report.smem:
        limits.append(SM90["smem"] // (report.smem + SM90["smem_per_block"]))
    return min(limits)


# --------------------------------------------------------------------------------------------
# CUDA: nvcc + ptxas -v, then the same SASS reading
# --------------------------------------------------------------------------------------------

def nvcc_path() -> str:
    path = os.path.join(cuda_home(), "bin", "nvcc")
    path = path if os.path.exists(path) else shutil.which("nvcc")
    if not path:
        raise ToolMissing("nvcc not found (set CUDA_HOME)")
    return path


def nvcc_command(source: str, archs: list, output: str) -> list:
    """nvcc for the device code only, with the flags torch's cpp_extension and setup.py pass
    when building nllfused._C: torch's COMMON_NVCC_FLAGS, -std=c++20, setup.py's -O3
    --use_fast_math -lineinfo and macros, torch's extension defines, torch + CUDA +
    nvidia-wheel + Python include dirs; -Xptxas -v for registers and spills. One fatbin holds
    every architecture (no host compilation: only the device code is of interest)."""
    import torch
    from torch.utils import cpp_extension
    nvcc = nvcc_path()
    archs_list = ";".join(f"{a // 10}.{a % 10}" for a in archs)
    includes = cpp_extension.include_paths(device_type="cuda")
    includes.append(os.path.join(os.path.dirname(os.path.dirname(nvcc)), "include"))
    try:
        import nvidia  # pip's CUDA wheels: torch's headers include cusparse.h from there
        for base in nvidia.__path__:
            includes += sorted(glob.glob(os.path.join(base, "*", "include")))
    except ImportError:
        pass
    includes.append(sysconfig.get_paths()["include"])
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return [nvcc, "-fatbin", *gencode, "-Xptxas", "-v", *cpp_extension.COMMON_NVCC_FLAGS,
            "-O3", "--use_fast_math", "-lineinfo", "-std=c++20",
            "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
            "-DNLLFUSED_WITH_CUDA", f'-DNLLFUSED_CUDA_ARCHS="{archs_list}"',
            f'-DNLLFUSED_TORCH_VERSION="{torch.__version__}"',
            *[f"-I{d}" for d in dict.fromkeys(includes)],
            source, "-o", output]


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas_log(text: str) -> dict:
    """{(arch, mangled name): dict(regs, spill_stores, smem)} from ptxas -v output."""
    kernels, current = {}, None
    for line in text.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            current = kernels.setdefault((int(m.group(2)), m.group(1)),
                                         dict(regs=None, spill_stores=0, smem=0))
        elif current is not None and (m := _PTXAS_SPILL.search(line)):
            current["spill_stores"] = int(m.group(2))
        elif current is not None and (m := _PTXAS_USED.search(line)):
            current["regs"] = int(m.group(1))
            current["smem"] = int(m.group(2) or 0)
    return kernels


def demangle(names: list) -> dict:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    pretty = out.stdout.splitlines()
    return dict(zip(names, pretty)) if len(pretty) == len(names) else {n: n for n in names}


_CUDA_DTYPES = {"float": "fp32", "double": "fp64", "c10::Half": "fp16",
                "c10::BFloat16": "bf16"}


def cuda_flag_names(root: str) -> dict:
    """{bit: name} of the CUDA kernels' feature flags (enum CeFlag in
    csrc/cuda/ce_thread.cuh: kProb = 1 -> "prob"), so the report names a kernel's flags."""
    try:
        text = open(os.path.join(root, "csrc", "cuda", "ce_thread.cuh")).read()
    except OSError:
        return {}
    block = re.search(r"enum\s+CeFlag\b[^{]*\{(.*?)\}", text, re.S)
    pairs = re.findall(r"\bk(\w+)\s*=\s*(\d+)", block.group(1)) if block else []
    return {int(value): name.lower() for name, value in pairs}


def cuda_launch_threads(root: str) -> Optional[int]:
    """The largest block the CUDA launcher uses (kLaunchThreads in csrc/cuda/ce_kernels.cuh)."""
    try:
        text = open(os.path.join(root, "csrc", "cuda", "ce_kernels.cuh")).read()
    except OSError:
        return None
    m = re.search(r"\bkLaunchThreads\s*=\s*(\d+)", text)
    return int(m.group(1)) if m else None


def describe_flags(value: str, names: dict) -> str:
    """"9" -> "prob+smooth" by the CeFlag bits; "-" for none; the text itself if no number."""
    if not value.isdigit() or not names:
        return value or "?"
    bits = int(value)
    on = [name for bit, name in sorted(names.items()) if bits & bit]
    return "+".join(on) or "-"


def describe_cuda_kernel(pretty: str) -> tuple:
    """(kernel, dtype, template args) from a demangled name such as
    `void ns::ce_fwd_rows_kernel<float, long>(...)`."""
    m = re.search(r"(\w+)<(.*?)>\(", pretty)
    if not m:
        return re.sub(r"\(.*", "", pretty).split("::")[-1], "?", ""
    args = [a.strip().split("::")[-1] if "cuda_impl" in a else a.strip()
            for a in m.group(2).split(",")]
    dtype = _CUDA_DTYPES.get(args[0], "?")
    return m.group(1), dtype, ",".join(args[1:])


def compile_cuda_source(source: str, archs: list, workdir: str) -> tuple:
    """(ptxas log, SASS text) of one .cu; RuntimeError with nvcc's message on failure."""
    output = os.path.join(workdir, os.path.basename(source) + ".fatbin")
    proc = subprocess.run(nvcc_command(source, archs, output), capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
        raise RuntimeError(_last_lines("\n".join(errors) or proc.stderr, 8))
    return proc.stdout + proc.stderr, disassemble(output, "-sass")


def cuda_reports(source: str, archs: list, workdir: str, root: str = REPO_ROOT) -> list:
    name = os.path.basename(source)
    flag_names, threads = cuda_flag_names(root), cuda_launch_threads(root)
    try:
        log, sass = compile_cuda_source(source, archs, workdir)
    except RuntimeError as exc:
        return [Report("cuda", name, a, "-", "-", "-", True, error=str(exc)) for a in archs]
    usage, functions = parse_ptxas_log(log), parse_sass(sass)
    pretty = demangle(sorted({n for _, n in usage}))
    reports = []
    for (arch, mangled), info in sorted(usage.items(), key=lambda kv: (kv[0][0], pretty[kv[0][1]])):
        kernel, dtype, targs = describe_cuda_kernel(pretty[mangled])
        report = Report("cuda", kernel, arch, dtype, "-", describe_flags(targs, flag_names),
                        lm_path="rows" in kernel and dtype in LM_DTYPES, plain=targs == "0",
                        regs=info["regs"], spills=info["spill_stores"] // 4, smem=info["smem"],
                        threads=threads)
        loop = loop_stats(functions.get((arch, mangled), []))
        if loop is not None:
            elems, report.elems_estimated = loop_elements(loop, dtype)
            _fill_loop(report, loop, elems)
        reports.append(report)
    return reports


def run_cuda(archs: list, root: str, progress) -> list:
    sources = sorted(glob.glob(os.path.join(root, "csrc", "cuda", "*.cu")))
    if not sources:
        raise ToolMissing(f"no CUDA sources under {root}/csrc/cuda (pass --root)")
    reports = []
    with tempfile.TemporaryDirectory() as workdir:
        for source in sources:
            progress(f"nvcc {os.path.basename(source)} for sm_{', sm_'.join(map(str, archs))}")
            reports += cuda_reports(source, archs, workdir, root)
    return reports


