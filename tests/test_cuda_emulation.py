"""The CUDA backend's per-thread code, run on the CPU by a host emulation of its launches.

tests/cuda_emulation/emu.cu includes csrc/cuda/ce_kernels.cuh and simulates the kernels (row
groups of every G, tiles of every TY, butterfly and block reductions, grid-stride loops) with the
real __host__ __device__ functions, so the CUDA backend's numerics and indexing are tested on
machines without a GPU. Each case runs the emulated forward, then the emulated backward from
the forward's own lse/aux, and compares with float64 torch (tests/reference.py): the backward
with grad_lse too, against the gradient of (loss_rows * grad_loss + lse_rows * grad_lse).sum().
z-loss reaches the kernels that way (grad_lse = 2 z lse grad_loss on counted rows, as the Python
layer does), so the cases with zl > 0 check it; cases with glse set use random grad_lse with
zero rows.

Skipped when torch has no CUDA build or nvcc is not found; the compile (nvcc, ~1-2 minutes on
two cores) happens once per session, in a temporary directory.
"""
import dataclasses
import glob
import importlib.util
import math
import os
import re
import subprocess
import tempfile

import pytest
import torch
import torch.nn.functional as F

from reference import assert_matches_oracle, reference

HERE = os.path.dirname(os.path.abspath(__file__))
EMU_SOURCE = os.path.join(HERE, "cuda_emulation", "emu.cu")
# csrc/build_helpers.py, setup.py's own: where nvcc and the nvidia wheels' headers are. Loaded
# from the checkout (csrc/ is no package, and the tests may run against an installed nllfused).
_spec = importlib.util.spec_from_file_location(
    "nllfused_build_helpers", os.path.join(os.path.dirname(HERE), "csrc", "build_helpers.py"))
build_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_helpers)

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPES = (F32, F64, BF16, F16)
LOW = (F16, BF16)
# Relative tolerance of the accumulation dtype (float32 for every logits dtype but float64),
# plus a floor relative to the row's scale (see run_case). float16/bfloat16 gradients are
# judged like tests/reference.py's assert_matches_oracle (against torch's own error there).
RTOL = {F32: 1e-5, F64: 1e-10}
SENTINELS = (12345.0, 777.0)  # what emu.cu pre-fills the outputs with


# ------------------------------------------------------------------------------------------
# Building the emulator.

def _cudart_ldflags(nvcc):
    """-L flags for libcudart, which cpp_extension links from CUDA_HOME/lib64.

    Without CUDA_HOME set, torch derives it from the nvcc on PATH, which may be a wrapper
    script (/usr/local/bin/nvcc -> CUDA_HOME=/usr/local); then ask nvcc where its libraries
    are. None: libcudart not found."""
    from torch.utils import cpp_extension
    if glob.glob(os.path.join(cpp_extension.CUDA_HOME, "lib64", "libcudart.so*")):
        return []
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "empty.cu")
        open(src, "w").close()
        try:
            out = subprocess.run([nvcc, "--dryrun", "-c", src, "-o", src + ".o"], cwd=tmp,
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
    libs = [m for line in (out.stdout + out.stderr).splitlines() if "LIBRARIES=" in line
            for m in re.findall(r'-L"?([^"\s]+)', line)]
    libs = [d for d in libs if glob.glob(os.path.join(d, "libcudart.so*"))]
    return ["-L" + d for d in libs[:1]] or None


_LOADED = []  # the emulator's ops once built: a library registers its ops once per process


@pytest.fixture(scope="session")  # also test_cuda_emulation_stats.py's (which imports it)
def emu(tmp_path_factory):
    if _LOADED:
        return _LOADED[0]
    reason = build_helpers.nvcc_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    from torch.utils.cpp_extension import CUDA_HOME, load
    ldflags = _cudart_ldflags(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if ldflags is None:
        pytest.skip(f"libcudart not found for the nvcc in {CUDA_HOME} (set CUDA_HOME)")
    load(name="nllfused_cuda_emulation", sources=[EMU_SOURCE],
         # emu.cu is host code (its device pass is empty): one PTX-only target, whose arch flag
         # also stops torch from adding TORCH_CUDA_ARCH_LIST's.
         extra_cuda_cflags=["-O2", "-std=c++20", "-gencode=arch=compute_80,code=compute_80"],
         extra_include_paths=build_helpers.nvidia_wheel_includes(), extra_ldflags=ldflags,
         build_directory=str(tmp_path_factory.mktemp("cuda_emulation_build")),
         is_python_module=False, verbose=False)
    _LOADED.append(torch.ops.nllfused_emu)
    return _LOADED[0]


# ------------------------------------------------------------------------------------------
# Cases.

@dataclasses.dataclass(frozen=True)
class Case:
    N: int
    C: int
    D: int
    dtype: torch.dtype
    layout: str = "contig"  # contig | offset | btv | cstride | tr (see make_logits)
    tgt: str = "i64"        # i64 | i32 | u8 | prob16 | probbf | prob32 | prob64 | problike
    #                         (problike: probabilities in the logits' dtype)
    weight: bool = False
    e: float = 0.0          # label smoothing
    zl: float = 0.0         # z-loss, through grad_lse = 2 zl lse grad_loss on counted rows
    glse: bool = False      # random grad_lse, some rows 0 (an ignored row's gets through)
    a: float = 1.0          # logit scale
    s: float = 0.0          # softcap (0: none)
    ii: int = -100          # ignore_index
    extreme: str = ""       # "" | mask | big | conf | far (float64) | huge (f32, bf16) |
    #                         crowd (f32)
    force: tuple = (-1, 0, 0, 0, 0)  # (force_tile, force_G, force_ty, max_blocks, force_parts),
    #                                  see emu.cu
    expect: str = ""        # forward mapping to expect from choose_launch: "" | rows | tile

    @property
    def prob(self):
        return self.tgt.startswith("prob")

    @property
    def id(self):
        parts = [str(self.dtype).replace("torch.", ""), f"N{self.N}C{self.C}D{self.D}",
                 self.layout, self.tgt]
        if self.weight:
            parts.append("w")
        for name, val, default in (("e", self.e, 0.0), ("zl", self.zl, 0.0),
                                   ("a", self.a, 1.0), ("cap", self.s, 0.0)):
            if val != default:
                parts.append(f"{name}{val:g}")
        if self.glse:
            parts.append("glse")
        if self.ii != -100:
            parts.append(f"ii{self.ii}")
        if self.extreme:
            parts.append(self.extreme)
        tile, G, ty, blocks, pieces = self.force
        if tile == 0 and G:
            parts.append(f"G{G}")
        elif tile == 1:
            parts.append(f"tile{ty or ''}")
        if blocks:
            parts.append(f"grid{blocks}")
        if pieces:
            parts.append(f"parts{pieces}")
        return "-".join(parts)


def _rows_layout(layout):
    return layout in ("contig", "offset")


def sweep_cases():
    # C around the vector widths, the G thresholds and the one-row-per-block switch.
    cs = (1, 3, 8, 9, 33, 257, 1025, 4099)
    out = []
    for dt in DTYPES:
        for C in cs:
            for layout, D in (("contig", 1), ("offset", 1), ("btv", 3), ("cstride", 2),
                              ("tr", 1), ("contig", 3)):
                expect = "rows" if (layout in ("contig", "offset") and D == 1) or \
                    layout == "btv" or C == 1 else "tile"
                out.append(Case(N=5, C=C, D=D, dtype=dt, layout=layout, expect=expect))
    return out


FEATURES = (  # (target, weight, smoothing, z-loss, scale, softcap, ignore_index)
    ("i64", True, 0.1, 0.0, 1.0, 0.0, -100),
    ("i32", True, 0.0, 1e-3, 0.7, 0.0, 2),
    ("u8", False, 0.2, 1e-2, 1.0, 5.0, 3),
    ("i64", True, 1.0, 0.0, 1.3, 3.0, -1),
    ("prob32", False, 0.0, 0.0, 1.0, 0.0, -100),
    ("prob16", True, 0.1, 1e-3, 0.9, 4.0, -100),
    ("probbf", True, 0.0, 0.0, 1.0, 0.0, -100),
    ("prob64", False, 0.3, 0.0, 1.0, 2.0, -100),
    # the option sets with kernels of their own (RowsFlagSets in csrc/cuda/ce_host.h), besides
    # the plain one: smoothing alone, softcap alone, both (above, u8), probabilities in the
    # logits' dtype (with and without smoothing)
    ("i64", False, 0.1, 0.0, 1.0, 0.0, -100),
    ("i32", False, 0.0, 1e-3, 1.0, 20.0, 1),
    ("problike", False, 0.0, 0.0, 1.0, 0.0, -100),
    ("problike", False, 0.2, 1e-3, 1.0, 0.0, -100),
)


def feature_cases():
    out = []
    layouts = (("contig", 1), ("offset", 1), ("btv", 2), ("cstride", 2))
    cs = (3, 50, 700, 3000)
    for dt in DTYPES:
        for k, (tgt, w, e, zl, a, s, ii) in enumerate(FEATURES):
            for j, (layout, D) in enumerate(layouts):
                out.append(Case(N=6, C=cs[(j + k) % len(cs)], D=D, dtype=dt, layout=layout,
                                tgt=tgt, weight=w, e=e, zl=zl, a=a, s=s, ii=ii,
                                glse=zl == 0.0 and j % 2 == 1))
    return out


def extreme_cases():
    out = []
    for dt in DTYPES:
        far = ("far",) if dt == F64 else ("huge",) if dt in (F32, BF16) else ()
        for extreme in ("mask", "big", "conf") + far:
            for k, (tgt, w, zl) in enumerate((("i64", False, 0.0), ("i64", True, 1e-3),
                                              ("prob32", False, 0.0))):
                for j, (layout, D) in enumerate((("contig", 1), ("btv", 2))):
                    C = (5, 300, 2050)[(j + k) % 3]
                    out.append(Case(N=6, C=C, D=D, dtype=dt, layout=layout, tgt=tgt, weight=w,
                                    zl=zl, extreme=extreme, glse=zl == 0.0 and j == 1))
    out += [Case(N=4, C=4000, D=D, dtype=F32, extreme="crowd") for D in (1, 2)]
    return out


FORCES = (  # every G (with and without a capped grid), the tile mapping with every TY, rows
    # split in pieces (more pieces than vectors too: empty pieces), alone and with a G
    (0, 4, 0, 1, 0), (0, 8, 0, 0, 0), (0, 16, 0, 2, 0), (0, 32, 0, 1, 0), (0, 64, 0, 2, 0),
    (0, 128, 0, 0, 0), (0, 256, 0, 3, 0), (0, 512, 0, 1, 0), (1, 0, 0, 0, 0), (1, 0, 1, 1, 0),
    (1, 0, 2, 0, 0), (1, 0, 4, 2, 0), (1, 0, 8, 1, 0), (1, 0, 16, 3, 0), (-1, 0, 0, 1, 0),
    (0, 0, 0, 0, 2), (0, 0, 0, 3, 3), (0, 0, 0, 0, 7), (0, 64, 0, 5, 4), (0, 8, 0, 0, 5))


def forced_cases():
    # N large enough that a capped grid makes every mapping loop (64 rows per block for G=4).
    out = []
    cs = (1, 5, 77, 1000, 5000)
    for dt in (F32, BF16, F64):
        for k, force in enumerate(FORCES):
            C = cs[k % len(cs)]
            if force[0] == 1 and 0 < force[2] <= 2:
                C = min(C, 700)  # serial sweeps: keep d's float32 rounding (~sqrt(C) eps) small
            N = 150 if C <= 77 else 40
            out.append(Case(N=N, C=C, D=1, dtype=dt, layout="offset", weight=True, e=0.1,
                            zl=1e-3, force=force))
            out.append(Case(N=7, C=cs[(k + 2) % len(cs)], D=5, dtype=dt, layout="btv",
                            tgt="prob32", weight=True, e=0.1, force=force, glse=k % 2 == 0))
    return out


def large_cases():
    out = []
    for dt in (F32, BF16):
        out += [Case(N=2, C=70000, D=1, dtype=dt, layout="offset", weight=True, e=0.1, zl=1e-4),
                Case(N=3, C=70000, D=1, dtype=dt, glse=True),
                Case(N=2, C=70000, D=1, dtype=dt, tgt="prob32"),
                Case(N=1, C=300000, D=1, dtype=dt),
                Case(N=2, C=20000, D=2, dtype=dt, layout="cstride", e=0.1),
                # the tile mapping's threads each add up C / TY near-equal terms of t and w
                Case(N=2, C=30000, D=4, dtype=dt, tgt="prob32", e=1.0)]
    return out


def params(cases):
    return [pytest.param(c, id=c.id) for c in cases]


# ------------------------------------------------------------------------------------------
# Inputs.

def make_logits(c: Case):
    """Logits of case c in its dtype and memory layout."""
    N, C, D = c.N, c.C, c.D
    x = torch.randn(N, C, D) * 3
    if c.extreme == "mask":
        x = x.masked_fill(torch.rand(x.shape) < 0.3, float("-inf"))
        x[0] = float("-inf")  # all -inf rows: NaN
    elif c.extreme == "big":
        # logits far from zero (+-1e4 + noise): torch's float32 answer is accurate, so must ours be
        x = x + torch.where(torch.arange(N) % 2 == 0, 1e4, -1e4).view(N, 1, 1)
    elif c.extreme == "far":
        # float64 logits at +-3e7 with their usual spread: the saved lse's own rounding there
        # (ulp 7.5e-9) must not enter p, as none enters torch's log p = (z - m) - log s
        x = x.double() + torch.where(torch.arange(N) % 2 == 0, 3e7, -3e7).view(N, 1, 1)
    elif c.extreme == "huge":
        # logits at 3e7, -1e12 and 1e20, where the float's ulp is 2 or more (so mostly ties):
        # p from z - m, never from 2^(m log2 e)'s rounding (up to 2^43 at 1e20) nor from a lse
        # that has lost log s (1e20 + 8 is 1e20 even in float64)
        x = x.double() + torch.tensor([3e7, -1e12, 1e20]).repeat(N)[:N].view(N, 1, 1)
    elif c.extreme == "crowd":
        # float32 logits at 1e8 (|lse| >= 2^26, where the backward reads each row again for m
        # and log s) whose terms are mostly tiny beside the max's: two classes at the max, a
        # tenth of them e^-8 below, the rest e^-16 -- which a float sum of them would drop
        x = torch.full((N, C, D), 1e8, dtype=F64)
        x[:, :2] += 16
        x[:, 2:C // 10] += 8
    if c.layout == "contig":
        out = torch.empty(N, C, D, dtype=c.dtype)
    elif c.layout == "offset":  # storage offset 5: rows start off 16-byte boundaries
        out = torch.empty(N * C * D + 5, dtype=c.dtype)[5:].view(N, C, D)
    elif c.layout == "btv":  # (B, T, V) seen as (B, V, T): sC == 1 with D > 1
        out = torch.empty(N, D, C, dtype=c.dtype).transpose(1, 2)
    elif c.layout == "cstride":  # class stride 2
        out = torch.empty(N, 2 * C, D, dtype=c.dtype)[:, ::2, :]
    elif c.layout == "tr":  # (C, N, D) permuted: sN == 1
        out = torch.empty(C, N, D, dtype=c.dtype).permute(1, 0, 2)
    else:
        raise ValueError(c.layout)
    return out.copy_(x)


def make_target(c: Case, x):
    N, C, D = c.N, c.C, c.D
    if c.prob:
        pd = {"prob16": F16, "probbf": BF16, "prob32": F32, "prob64": F64,
              "problike": c.dtype}[c.tgt]
        if C % 2:  # class-major probabilities, transposed
            q = torch.softmax(torch.randn(N, D, C) * 2, 2).to(pd).transpose(1, 2)
        else:
            q = torch.softmax(torch.randn(N, C, D) * 2, 1).to(pd)
        if c.extreme == "mask":  # odd rows: no mass on their -inf classes, so a finite loss
            x[N - 1] = float("-inf")  # and an all -inf one without any mass: loss 0
            odd = (torch.arange(N) % 2 == 1).view(N, 1, 1)
            q.masked_fill_((x == float("-inf")) & odd, 0.0)
        return q
    it = {"i64": torch.int64, "i32": torch.int32, "u8": torch.uint8}[c.tgt]
    y = torch.randint(0, min(C, 255) if it == torch.uint8 else C, (N, D))
    flat = y.view(-1)
    if flat.numel() > 4:
        if it != torch.uint8 or 0 <= c.ii <= 255:
            flat[1] = c.ii
        if it != torch.uint8 or C + 1 <= 255:
            flat[2] = C + 1  # out of range: NaN
        if it != torch.uint8:
            flat[3] = -7 if c.ii != -7 else -8
    for n in range(N):
        for d in range(D):
            yy = int(y[n, d])
            if not 0 <= yy < C or yy == c.ii:
                continue
            if c.extreme == "mask" and n != 0 and x[n, yy, d] == float("-inf"):
                x[n, yy, d] = 1.0  # finite losses except in the all -inf row
            elif c.extreme == "conf":
                x[n, yy, d] = x[n, yy, d] + 30.0  # p_y -> 1: gradients ~1e-12 of the row scale
    t = y.to(it)
    if C % 2:  # strided targets
        t = torch.stack([t, t], -1)[..., 0]
    return t


# ------------------------------------------------------------------------------------------
# Oracle: float64 torch via tests/reference.py, row by row on (N*D, C).

def rows_of(t):
    """(N, C, D) -> (N*D, C)."""
    return t.permute(0, 2, 1).reshape(-1, t.shape[1])


def lse_grad(c: Case, x, gs, dtype):
    """grad_lse's part of the logits' gradient, computed in `dtype`: gs[r] p_c dz_c/dx_c on rows
    where gs != 0, exactly 0 elsewhere (so no 0 * NaN on an all -inf row). (N*D, C)."""
    xr = rows_of(x).detach().to(dtype).requires_grad_(True)
    z = xr * c.a if c.a != 1.0 else xr
    if c.s:
        z = c.s * torch.tanh(z / c.s)
    gs = gs.reshape(-1).to(dtype)
    dlse_dz = torch.softmax(z.detach(), 1) * gs[:, None]
    dlse_dz = torch.where((gs != 0)[:, None], dlse_dz, torch.zeros((), dtype=dtype))
    (g,) = torch.autograd.grad((z * dlse_dz).sum(), xr)
    return g


def soft_reference(c: Case, xr, t, w, g, dtype):
    """(loss rows, grad) for probability targets, computed in `dtype` as torch does, except that
    a class with w_c q'_c == 0 adds nothing even at z_c = -inf (csrc/ops.cpp), where torch's
    0 * -inf makes the row NaN."""
    xd = xr.detach().to(dtype).requires_grad_(True)
    z = xd * c.a if c.a != 1.0 else xd
    if c.s:
        z = c.s * torch.tanh(z / c.s)
    q = (1 - c.e) * t.to(dtype) + c.e / c.C
    if w is not None:
        q = q * w.to(dtype)
    rows = -torch.where(q != 0, q * torch.log_softmax(z, 1), torch.zeros((), dtype=dtype)).sum(1)
    (grad,) = torch.autograd.grad(rows, xd, g.reshape(-1).to(dtype))
    return rows.detach(), grad


def oracle(c: Case, x, tgt, w, g, gs, dtype):
    """(loss, lse, aux, grad, max z, |z| scale or None, gradient scale) as torch computes them
    in `dtype`: grad = d/dx of (loss_rows * g + lse_rows * gs).sum(); grad is (N, C, D), the
    rest (N, D)."""
    N, C, D = c.N, c.C, c.D
    xr = rows_of(x)
    if c.prob:
        t = rows_of(tgt)
        bad = ignored = torch.zeros(N * D, dtype=torch.bool)
    else:
        y = tgt.reshape(-1).long()
        ignored = y == c.ii
        bad = ~ignored & ((y < 0) | (y >= C))
        t = torch.where(bad, torch.full_like(y, c.ii), y)
    if c.prob:
        loss, grad = soft_reference(c, xr, t, w, g, dtype)
    else:
        loss, grad = reference(xr, t, weight=w, ignore_index=c.ii, reduction="none",
                               label_smoothing=c.e, logit_scale=c.a, softcap=c.s or None,
                               dtype=dtype, grad=g.reshape(-1))
    x64 = xr.double() * c.a
    z = c.s * torch.tanh(x64 / c.s) if c.s else x64
    lse = torch.logsumexp(z, 1)
    w64 = torch.ones(C, dtype=F64) if w is None else w.double()
    if c.prob:
        aux = (w64 * ((1 - c.e) * t.double() + c.e / C)).sum(1)
    else:
        aux = torch.where(ignored, 0.0, w64[t.clamp(0, C - 1)])
    loss, aux = loss.clone(), aux.clone()
    glse = lse_grad(c, x, gs, dtype)
    # contract: an ignored row has no loss part (torch gives NaN on an all -inf one)
    grad = torch.where(ignored[:, None], glse, grad + glse)
    loss[bad] = aux[bad] = float("nan")
    grad[bad] = float("nan")
    # The scale of the row's gradient: grad_loss times the coefficient of p in it (the terms
    # that cancel in p_y - 1 or against the smoothing term carry this absolute error), plus
    # grad_lse's coefficient of p.
    coef = aux if c.prob else (1 - c.e) * w64[t.clamp(0, C - 1)] + c.e * w64.sum() / C
    coef = torch.where(ignored | bad, 0.0, coef)
    gscale = abs(c.a) * (g.reshape(-1).double().abs() * coef + gs.reshape(-1).abs())
    gscale = gscale.nan_to_num(0.0, 0.0, 0.0)
    zmax = z.amax(1)
    zscale = z.abs().nan_to_num(0.0, 0.0, 0.0).amax(1) if (c.a != 1.0 or c.s) else None
    unrows = lambda v: v.view(N, D)  # noqa: E731
    grad = grad.view(N, D, C).permute(0, 2, 1)
    return (unrows(loss), unrows(lse), unrows(aux), grad, unrows(zmax),
            None if zscale is None else unrows(zscale), unrows(gscale))


def make_grad_lse(c: Case, tgt, lse, g):
    """grad_lse of case c, (N, D) float64 with strides, or None."""
    if c.glse:
        gs = torch.randn(c.N, 2 * c.D, dtype=F64)[:, ::2]
        flat = gs.reshape(-1)  # a copy: strided
        flat[(c.C % 3)::3] = 0.0  # zero rows (C = 5, D = 2: the ignored all -inf row among them)
        gs.copy_(flat.view(c.N, c.D))
        return gs
    if c.zl:
        # z-loss as the Python layer adds it: z lse^2 on counted rows, so grad_lse = 2 z lse g
        counted = torch.ones(c.N, c.D, dtype=torch.bool) if c.prob else tgt.long() != c.ii
        return torch.where(counted, 2 * c.zl * lse * g.double(), 0.0)
    return None


def check_close(what, got, exp, rtol, floor):
    """|got - exp| <= rtol |exp| + floor elementwise; same NaN and infinity pattern."""
    got, exp = got.double(), exp.double()
    assert torch.equal(got.isnan(), exp.isnan()), (
        f"{what}: NaN pattern differs\n got {got}\n exp {exp}")
    inf = exp.isinf()
    assert torch.equal(got.isinf(), inf) and torch.equal(got[inf], exp[inf]), (
        f"{what}: infinities differ\n got {got}\n exp {exp}")
    fin = ~(inf | exp.isnan())
    floor = torch.as_tensor(floor, dtype=F64).expand_as(exp)
    err = (got - exp).abs()[fin]
    allowed = (rtol * exp.abs() + floor)[fin]
    if err.numel() and not bool((err <= allowed).all()):
        i = int((err - allowed).argmax())
        idx = fin.nonzero()[i].tolist()
        raise AssertionError(
            f"{what}: {int((err > allowed).sum())} of {err.numel()} outside tolerance; worst at "
            f"{idx}: got {got[tuple(idx)].item():.10g}, expected {exp[tuple(idx)].item():.10g}, "
            f"error {err[i].item():.3g} > allowed {allowed[i].item():.3g}")


def run_case(emu, c: Case):
    x = make_logits(c)
    tgt = make_target(c, x)
    acc = F64 if c.dtype == F64 else F32
    w = (torch.rand(c.C) + 0.5).to(acc) if c.weight else None  # weights in the accumulation dtype
    g = torch.randn(c.N, 2 * c.D, dtype=acc)[:, ::2]  # strided grad_loss
    args = (c.ii, c.e, c.a, c.s, c.prob, *c.force)

    loss, lse, aux, cfg = emu.fwd(x, tgt, w, *args)
    gs = make_grad_lse(c, tgt, lse, g)
    grad, bcfg = emu.bwd(g, gs, x, tgt, w, lse, aux, *args)
    where = f"fwd launch (tile, G, threads|TY, blocks) = {cfg.tolist()}, bwd {bcfg.tolist()}"

    assert loss.dtype == acc and aux.dtype == acc and lse.dtype == F64 and grad.dtype == c.dtype
    if c.expect:
        assert bool(cfg[0]) == (c.expect == "tile"), f"expected the {c.expect} mapping; {where}"
    tile, G, _, blocks, pieces = c.force
    if tile == 0 and G and _rows_layout(c.layout) and c.D == 1:
        assert cfg.tolist()[:2] == [0, G] and bcfg.tolist()[:2] == [0, G], where
    if tile == 0 and pieces and _rows_layout(c.layout) and c.D == 1:
        assert cfg[4] == pieces and bcfg[4] == pieces, where
    elif tile == 1:
        assert cfg[0] == 1 and bcfg[0] == 1, where
    if blocks:
        assert cfg[3] <= blocks and bcfg[3] <= blocks, where

    gs0 = torch.zeros(c.N, c.D, dtype=F64) if gs is None else gs
    e_loss, e_lse, e_aux, e_grad, zmax, zscale, gscale = oracle(c, x, tgt, w, g, gs0, F64)
    rtol = RTOL[acc]
    # Floors relative to the row's scale: 1, or max |z| where z = softcap(a x) is itself rounded.
    # loss and lse carry log d, d = sum_c exp(z_c - max z) in [1, C] rounded up to C times (a
    # serial sweep of the tile mapping): absolute error ~ rtol. aux and grad: rtol / 10.
    row_scale = torch.ones_like(e_lse) if zscale is None else zscale.clamp_min(1.0)
    try:
        check_close("loss", loss, e_loss, rtol, rtol * row_scale)
        check_close("aux", aux, e_aux, rtol, 0.1 * rtol * row_scale)
        # lse is float64 even for float32 logits: judge lse - max z = log d, which the kernel
        # keeps to float32 accuracy whatever max z is (a float32 lse would not, at |z| ~ 1e4).
        check_close("lse - max z", lse - zmax, e_lse - zmax, rtol, rtol * row_scale)
        if c.dtype in LOW:
            low_grad = oracle(c, x, tgt, w, g, gs0, c.dtype)[3]
            assert_matches_oracle(grad, e_grad, c.dtype, torch_same_dtype=low_grad, what="grad")
        else:
            gmax = e_grad.abs().nan_to_num(0.0, 0.0, 0.0).amax(1, keepdim=True)
            gscale = torch.maximum(gmax, gscale.unsqueeze(1))
            check_close("grad", grad, e_grad, rtol, 0.1 * rtol * gscale + 1e-300)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{where}") from None
    for s in SENTINELS:  # every output element written (a NaN pattern check passes NaN)
        assert not bool((grad.double() == s).any() or (loss.double() == s).any()), where
    return cfg, bcfg


# ------------------------------------------------------------------------------------------
# Tests.

@pytest.mark.parametrize("case", params(sweep_cases()))
def test_sweep(emu, case):
    """Every dtype, C and layout, plain cross-entropy; the default mapping is the expected one."""
    run_case(emu, case)


@pytest.mark.parametrize("case", params(feature_cases()))
def test_features(emu, case):
    """Target kinds and dtypes, weights, smoothing, z-loss, grad_lse, scale, softcap,
    ignore_index."""
    run_case(emu, case)


@pytest.mark.parametrize("case", params(extreme_cases()))
def test_extremes(emu, case):
    """-inf logits (all -inf rows: NaN), logits at +-1e4, confident rows (p_y -> 1), logits
    far from zero (float64 at +-3e7; float32 and bf16 at 3e7, -1e12, 1e20)."""
    run_case(emu, case)


@pytest.mark.parametrize("case", params(forced_cases()))
def test_forced_launch(emu, case):
    """Every row-group size G, the tile mapping with every TY, grids smaller than the rows."""
    run_case(emu, case)


@pytest.mark.parametrize("case", params(large_cases()))
def test_large_rows(emu, case):
    """Rows of 20k-300k classes (several sweeps of a 512-thread block); few of them, so the
    rows mapping splits each over several blocks (as on a 132-SM GPU) and merges the pieces;
    the tile mapping's threads each sweep C / TY classes of their row."""
    cfg, bcfg = run_case(emu, case)
    if _rows_layout(case.layout) and case.D == 1:
        assert cfg[4] > 1 and bcfg[4] > 1, (cfg.tolist(), bcfg.tolist())


@pytest.mark.parametrize("dtype", (F32, BF16))
def test_split_rows_do_not_depend_on_block_order(emu, dtype):
    """A split row's pieces are merged in piece order, whatever block computed which: the
    results of different grids (blocks looping over several pieces, in another order) are
    bit-identical."""
    c = Case(N=3, C=40000, D=1, dtype=dtype, layout="offset", weight=True, e=0.1)
    x = make_logits(c)
    tgt = make_target(c, x)
    w = torch.rand(c.C) + 0.5
    outs = []
    for grid in (0, 1, 5):
        loss, lse, aux, cfg = emu.fwd(x, tgt, w, c.ii, c.e, c.a, c.s, c.prob, -1, 0, 0, grid, 6)
        assert cfg[4] == 6, cfg
        outs.append((loss, lse, aux))
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


# The kernel variants (CeFlag bits, csrc/cuda/ce_thread.cuh) the options get.
PROB, SMOOTH, CAP, RUNTIME, PROBLIKE = 1, 8, 4, 32, 64
VARIANTS = (  # (target, weight, smoothing, scale, softcap) -> F of the rows kernel
    (("i64", False, 0.0, 1.0, 0.0), 0),
    (("i64", True, 0.0, 1.0, 0.0), 0),             # index targets: w_y once per row
    (("i64", False, 0.1, 1.0, 0.0), SMOOTH),
    (("i64", False, 0.0, 1.0, 30.0), CAP),
    (("i64", False, 0.1, 2.0, 30.0), SMOOTH | CAP),
    (("i64", True, 0.1, 1.0, 0.0), RUNTIME),        # per-class weights
    (("i64", False, 0.0, 2.0, 0.0), RUNTIME),       # scale without softcap
    (("problike", False, 0.1, 1.0, 0.0), PROB | PROBLIKE),
    (("prob64", False, 0.0, 1.0, 0.0), PROB | PROBLIKE),  # float32 logits: rounded once first
    (("prob16", False, 0.0, 1.0, 0.0), RUNTIME | PROB),
)


@pytest.mark.parametrize("spec,variant", VARIANTS)
def test_options_get_their_kernel_variant(emu, spec, variant):
    tgt_kind, weight, e, a, s = spec
    c = Case(N=4, C=300, D=1, dtype=F32, tgt=tgt_kind, weight=weight, e=e, a=a, s=s)
    cfg, bcfg = run_case(emu, c)
    assert cfg[5] == variant and bcfg[5] == variant, (cfg.tolist(), bcfg.tolist())


@pytest.mark.parametrize("dtype", (F32, BF16, F64))
@pytest.mark.parametrize("tgt", ("i64", "prob32"))
@pytest.mark.parametrize("a,s", ((0.7, 0.0), (1.3, 20.0)), ids=("scale", "softcap"))
@pytest.mark.parametrize("layout", ("contig", "tr"))
def test_one_class_transformed_has_zero_loss_and_gradient(emu, dtype, tgt, a, s, layout):
    """One class: p = 1 exactly, so loss and gradient are exactly 0 -- if every pass forms
    z = softcap(a x) the same way (to_z, to_z_chain). On the device that takes mul_rounded
    (__fmul_rn, which nvcc never fuses into z - lse; a fused one gives p = 1 + up to half an ulp
    of z); this host emulation checks the passes' arithmetic, the GPU run of
    tests/test_properties.py the device's. Logits around -50: a large half ulp."""
    c = Case(N=9, C=1, D=3, dtype=dtype, tgt=tgt, a=a, s=s, layout=layout)
    x = make_logits(c).copy_(torch.randn(c.N, 1, c.D) * 8 - 50)
    tgt = torch.rand(c.N, 1, c.D) if c.prob else torch.zeros(c.N, c.D, dtype=torch.long)
    g = torch.randn(c.N, c.D, dtype=F64 if dtype == F64 else F32)
    args = (c.ii, c.e, c.a, c.s, c.prob, *c.force)
    loss, lse, aux, _ = emu.fwd(x, tgt, None, *args)
    grad, _ = emu.bwd(g, None, x, tgt, None, lse, aux, *args)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("C", [3, 40, 3000])
@pytest.mark.parametrize("force", [(-1, 0, 0, 0, 0), (1, 0, 0, 0, 0), (0, 32, 0, 0, 0)],
                         ids=["default", "tile", "rows_G32"])
def test_rows_with_inf_as_torch(emu, C, force):
    """Rows holding +inf: lse +inf as torch.logsumexp (NaN where the row also holds a NaN), the
    loss and the whole row's gradient NaN as torch's log_softmax makes them, on every mapping."""
    x = torch.randn(6, C, 1)
    x[0, 1, 0] = float("inf")
    x[1, 2, 0] = float("inf")
    x[1, C - 1, 0] = float("nan")
    x[2, [0, C - 1], 0] = float("inf")
    x[3, 0, 0] = float("nan")
    x[4, :, 0] = float("-inf")
    t = torch.tensor([[0], [0], [0], [1], [0], [1]])
    loss, lse, aux, _ = emu.fwd(x, t, None, -100, 0.0, 1.0, 0.0, False, *force)
    torch.testing.assert_close(lse[:, 0], torch.logsumexp(x[..., 0].double(), 1), rtol=1e-6,
                               atol=1e-6, equal_nan=True)
    xr = x[..., 0].double().requires_grad_()
    ref = F.cross_entropy(xr, t[:, 0], reduction="none")
    g = torch.randn(6, 1)
    (ref_grad,) = torch.autograd.grad(ref, xr, g[:, 0].double())
    assert torch.equal(loss[:, 0].isnan(), ref.isnan())
    grad, _ = emu.bwd(g, None, x, t, None, lse, aux, -100, 0.0, 1.0, 0.0, False, *force)
    assert torch.equal(grad[..., 0].isnan(), ref_grad.isnan())


@pytest.mark.parametrize("C", [3, 40])
@pytest.mark.parametrize("force", [(-1, 0, 0, 0, 0), (1, 0, 0, 0, 0), (1, 0, 1, 0, 0),
                                   (0, 32, 0, 0, 0)], ids=["default", "tile", "tile1", "rows_G32"])
def test_rows_without_mass_as_the_rule(emu, C, force):
    """Probability targets without mass on a row: loss 0 (no class adds anything, even at -inf,
    docs/maths.md), unless the row holds a NaN or +inf: NaN, as torch's 0 * NaN -- on every
    mapping, whichever class a thread meets first."""
    x = torch.randn(5, C, 1)
    x[0, 1, 0] = float("nan")
    x[1, 2, 0] = float("inf")
    x[2, :, 0] = float("-inf")
    x[3, 0, 0] = float("-inf")
    q = torch.zeros(5, C, 1)
    loss, _, _, _ = emu.fwd(x, q, None, -100, 0.0, 1.0, 0.0, True, *force)
    assert loss[:, 0].isnan().tolist() == [True, True, False, False, False]
    assert torch.equal(loss[2:], torch.zeros_like(loss[2:]))


@pytest.mark.parametrize("force", [(-1, 0, 0, 0, 0), (1, 0, 0, 0, 0)], ids=["default", "tile"])
def test_max_at_2_pow_29(emu, force):
    """A row whose max is 2^29 exactly: the float below it is 32 below (64 only above 2^29), so
    its term is e^-32 -- which the forward's 2^(z - m) for rows far from zero would make 2^-32."""
    C = 5000
    x = torch.full((2, C, 1), 2.0 ** 29 - 32)
    x[:, 0] = 2.0 ** 29
    t = torch.zeros(2, 1, dtype=torch.long)
    loss, _, _, _ = emu.fwd(x, t, None, -100, 0.0, 1.0, 0.0, False, *force)
    expected = math.log1p((C - 1) * math.exp(-32))
    torch.testing.assert_close(loss.double(), torch.full((2, 1), expected, dtype=F64),
                               rtol=1e-5, atol=0)
