"""Runs the cases: for every case and provider, check against float64, then time and measure.

A provider that fails its check is reported as "wrong" and not timed. Out-of-memory and other
failures are reported per case ("oom", "error") and the run goes on.
"""
from __future__ import annotations

import functools
import gc
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from . import correctness, memory, timing
from .cases import Case, Inputs, make_inputs
from .progress import Progress


@dataclass
class Row:
    preset: str
    case: str
    kind: str
    shape: str
    dtype: str
    mode: str
    provider: str
    status: str  # ok, wrong, error, oom, n/a
    loss_err: Optional[float] = None
    grad_err: Optional[float] = None
    tolerance: Optional[float] = None
    time_ms: Optional[float] = None
    gbps: Optional[float] = None
    pct_of_copy: Optional[float] = None
    tflops: Optional[float] = None
    peak_mem_bytes: Optional[int] = None
    work_mem_bytes: Optional[int] = None  # peak less the gradients a fwd_bwd call returns
    speedup_vs_torch: Optional[float] = None
    # --baseline PROVIDER: that provider's time over this one's (on the CPU timed in pairs with
    # it, as against torch), e.g. what the statistics cost over the plain loss
    speedup_vs_baseline: Optional[float] = None
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


COLUMNS = list(Row.__dataclass_fields__)


def _free(device: torch.device) -> None:
    # Between providers on a GPU: give back what the last one left, so that the next one's
    # peak memory and out-of-memory failures are its own. (On the CPU, reference counting has
    # freed it already, and a gc pass costs ~0.3 s with torch loaded.)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _call(fn, inputs, mode: str):
    """The timed callable: the forward of a training step, or forward + backward."""
    args = inputs.args()
    if mode == "fwd":
        return lambda: fn(*args)
    return lambda: torch.autograd.grad(fn(*args), inputs.grad_inputs)


def _failure(exc: BaseException) -> tuple:
    if isinstance(exc, torch.OutOfMemoryError):
        return "oom", "out of memory"
    text = str(exc).strip().splitlines()
    return "error", f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


class Runner:
    def __init__(self, device: torch.device, providers: list, policy: timing.CpuPolicy,
                 copy_gbps: float, progress: Optional[Progress] = None,
                 time_budget_s: Optional[float] = None, baseline: Optional[str] = None):
        # torch first: its error sets the tolerance and its times the speedups; then the
        # baseline (a provider other than torch, or None), whose times set speedup_vs_baseline.
        self.baseline = baseline if baseline != "torch" else None
        self.providers = sorted(providers,
                                key=lambda p: (p.name != "torch", p.name != self.baseline))
        self.device = device
        self.policy = policy
        self.copy_gbps = copy_gbps
        self.progress = progress or Progress(0, enabled=False)
        self.time_budget_s = time_budget_s
        self.notes = []
        self._torch_calls = {}  # CPU: mode -> torch's call of the current case, for pairing
        self._baseline_calls = {}  # CPU: the same for the baseline
        self._shared_inputs = None  # the current case's inputs, for every provider that reads

    def run(self, cases: list, after_case=None) -> list:
        """Rows of every case; after_case(rows so far) is called as each case ends."""
        start = time.perf_counter()
        rows, skipped = [], []
        for case in cases:
            if self.time_budget_s is not None and time.perf_counter() - start > self.time_budget_s:
                skipped.append(f"{case.preset}/{case.name}/{case.short_dtype}")
                continue
            rows += self.run_case(case)
            if after_case is not None:
                after_case(rows)
        if skipped:
            self.notes.append(f"time budget of {self.time_budget_s:g} s reached: "
                              f"{len(skipped)} case(s) not run ({', '.join(skipped)})")
        return rows

    def run_case(self, case: Case) -> list:
        rows = []
        torch_error = None
        self._torch_calls, self._baseline_calls = {}, {}
        self._shared_inputs = None
        for provider in self.providers:
            self.progress.step(f"{case.preset} {case.name} {case.short_dtype} {provider.name}")
            provider_rows = self._run_provider(case, provider, torch_error)
            if provider.name == "torch" and provider_rows[0].loss_err is not None:
                torch_error = max(provider_rows[0].loss_err, provider_rows[0].grad_err)
            rows += provider_rows
            self.progress.advance()
            _free(self.device)
        self._torch_calls, self._baseline_calls = {}, {}
        self._shared_inputs = None
        torch_ms = {r.mode: r.time_ms for r in rows if r.provider == "torch" and r.time_ms}
        base_ms = {r.mode: r.time_ms for r in rows if r.provider == self.baseline and r.time_ms}
        for r in rows:  # GPU (and torch itself): against torch's own row
            if r.time_ms and r.mode in torch_ms and r.speedup_vs_torch is None:
                r.speedup_vs_torch = torch_ms[r.mode] / r.time_ms
            if (r.time_ms and r.mode in base_ms and r.speedup_vs_baseline is None
                    and r.provider != "torch"):  # GPU, and the baseline itself
                r.speedup_vs_baseline = base_ms[r.mode] / r.time_ms
        return rows

    @staticmethod
    def _row(case: Case, provider, mode: str, status: str, **fields) -> Row:
        return Row(case.preset, case.name, case.kind, "x".join(map(str, case.shape)),
                   case.short_dtype, mode, provider.name, status, **fields)

    def _rows(self, case: Case, provider, status: str, **fields) -> list:
        """One row per mode: the outcome of the check applies to all of them."""
        return [self._row(case, provider, mode, status, **fields) for mode in case.modes]

    def _run_provider(self, case: Case, provider, torch_error) -> list:
        reason = provider.unsupported(case)
        if reason is not None:
            return self._rows(case, provider, "n/a", note=reason)
        inputs = None
        try:
            fn = provider.function(case.kind)
            if case.options:  # the case's extras as keyword arguments
                fn = functools.partial(fn, **case.loss_options)
            inputs = self._inputs_for(case, provider)
            loss_err, grad_err = self._check(case, fn, inputs)
        except Exception as exc:  # noqa: BLE001 (any failure is reported, the run goes on)
            del inputs
            status, note = _failure(exc)
            return self._rows(case, provider, status, note=note)
        tol = correctness.tolerance(case.dtype, None if provider.name == "torch" else torch_error)
        checked = dict(loss_err=loss_err, grad_err=grad_err, tolerance=tol)
        if not (loss_err <= tol and grad_err <= tol):  # also catches NaN
            return self._rows(case, provider, "wrong", **checked,
                              note=f"loss err {loss_err:.1e}, grad err {grad_err:.1e} > "
                                   f"tol {tol:.0e}: not timed")
        rows = []
        for mode in case.modes:
            row = self._row(case, provider, mode, "ok", **checked)
            try:
                self._measure(case, fn, inputs, mode, row)
            except Exception as exc:  # noqa: BLE001
                row.status, row.note = _failure(exc)
                row.time_ms = None
            rows.append(row)
        return rows

    def _inputs_for(self, case: Case, provider) -> Inputs:
        """One set of inputs a case, shared by the providers that only read them.

        Two tensors of the same values can run at different speeds: on a 4 KiB-page CPU machine
        (a VM above all) the same kernel on two allocations of the same size differs by up to
        ~20 %, by where their pages lie. Timed on one tensor, paired ratios hold that constant.
        A provider that writes into its inputs (Liger's forward leaves the gradient in the
        logits) gets its own."""
        if provider.mutates_inputs:
            return make_inputs(case, self.device)
        if self._shared_inputs is None:
            self._shared_inputs = make_inputs(case, self.device)
        return self._shared_inputs

    def _check(self, case: Case, fn, inputs) -> tuple:
        loss = fn(*inputs.args())
        grads = torch.autograd.grad(loss, inputs.grad_inputs)
        loss = loss.detach()
        return correctness.errors(case, self.device, loss, list(grads))

    def _measure(self, case: Case, fn, inputs, mode: str, row: Row) -> None:
        call = _call(fn, inputs, mode)
        torch_call = self._torch_calls.get(mode)
        if self.device.type == "cpu" and row.provider == "torch":
            self._torch_calls[mode] = call  # kept (with its inputs) for the other providers
        if self.device.type == "cpu" and torch_call is not None:
            row.time_ms, torch_ms = timing.paired_median_ms(call, torch_call, self.policy)
            row.speedup_vs_torch = torch_ms / row.time_ms
        else:
            row.time_ms = timing.median_ms(call, self.device, self.policy)
        if self.device.type == "cpu" and row.provider == self.baseline:
            self._baseline_calls[mode] = call
        elif self.device.type == "cpu" and mode in self._baseline_calls and row.provider != "torch":
            ms, base_ms = timing.paired_median_ms(call, self._baseline_calls[mode], self.policy)
            row.speedup_vs_baseline = base_ms / ms
        row.peak_mem_bytes = memory.peak_bytes_above_current(call, self.device)
        if row.peak_mem_bytes is not None:
            returned = 0 if mode == "fwd" else sum(
                t.numel() * t.element_size() for t in inputs.grad_inputs)
            row.work_mem_bytes = row.peak_mem_bytes - returned
        seconds = row.time_ms * 1e-3
        floor = case.floor_bytes(mode)
        if floor is not None:
            row.gbps = floor / seconds / 1e9
            row.pct_of_copy = 100.0 * row.gbps / self.copy_gbps if self.copy_gbps else None
        flops = case.flops(mode)
        if flops is not None:
            row.tflops = flops / seconds / 1e12
