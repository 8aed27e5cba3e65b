"""Writing results: the table on stdout, results.csv, results.json and the PNG plots."""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Optional

from .cases import MODES
from .runner import COLUMNS

META_COLUMNS = ("device", "torch", "triton", "git_commit", "date")
PLOTS = ("speed.png", "memory.png")


def _fmt(value, spec: str, empty: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return empty
    return format(value, spec)


def _check_cell(row: dict) -> str:
    status = row["status"]
    if status in ("ok", "wrong"):
        errs = [e for e in (row["loss_err"], row["grad_err"]) if e is not None]
        worst = max(errs, key=lambda e: (e != e, e)) if errs else float("nan")
        return f"{'ok' if status == 'ok' else 'WRONG'} {_fmt(worst, '.0e', 'nan')}"
    return status


def ordered(rows: list) -> list:
    """Rows grouped by case (in run order), then mode, then provider (in run order)."""
    case_order, provider_order = {}, {}
    for r in rows:
        case_order.setdefault((r["preset"], r["case"], r["dtype"]), len(case_order))
        provider_order.setdefault(r["provider"], len(provider_order))
    mode_order = {m: i for i, m in enumerate(MODES)}
    return sorted(rows, key=lambda r: (case_order[(r["preset"], r["case"], r["dtype"])],
                                       mode_order.get(r["mode"], 99),
                                       provider_order[r["provider"]]))


def case_labels(rows: list) -> dict:
    """{(preset, case): the name to print}: the case's name, with its preset beside it where
    the same name is a case of two presets of the run (smoke and small both time N256·C1000)."""
    presets_of = {}
    for r in rows:
        presets_of.setdefault(r["case"], set()).add(r["preset"])
    return {(r["preset"], r["case"]): r["case"] if len(presets_of[r["case"]]) == 1
            else f"{r['case']} ({r['preset']})" for r in rows}


def table(rows: list, baseline: Optional[str] = None) -> str:
    """The readable table: one line per case x mode x provider (n/a ones only in the files);
    with a baseline other than torch (--baseline), a column of speedups against it too."""
    rows = [r for r in ordered(rows) if r["status"] != "n/a"]
    label = case_labels(rows)
    has_ce = any(r["kind"] == "ce" for r in rows)
    has_linear = any(r["kind"] == "linear" for r in rows)
    headers = ["case", "dtype", "mode", "provider", "time ms"]
    if has_ce:
        headers += ["GB/s", "%copy"]
    if has_linear:
        headers += ["TFLOP/s"]
    has_base = baseline not in (None, "torch")
    headers += ["peak MB"] + (["work MB"] if has_linear else []) + ["vs torch"]
    headers += ([f"vs {baseline}"] if has_base else []) + ["check"]
    lines = []
    previous = None
    for r in rows:
        key = (r["preset"], r["case"], r["dtype"])
        first = key != previous
        previous = key
        cells = [label[r["preset"], r["case"]] if first else "", r["dtype"] if first else "",
                 r["mode"], r["provider"], _fmt(r["time_ms"], ".3f")]
        if has_ce:
            cells += [_fmt(r["gbps"], ".1f"),
                      _fmt(r["pct_of_copy"], ".0f") + ("%" if r["pct_of_copy"] else "")]
        if has_linear:
            cells += [_fmt(r["tflops"], ".2f")]
        peak = r["peak_mem_bytes"]
        cells += [_fmt(None if peak is None else peak / 1e6, ".1f")]
        if has_linear:
            work = r.get("work_mem_bytes")
            cells += [_fmt(None if work is None else work / 1e6, ".1f")]
        cells += [_fmt(r["speedup_vs_torch"], ".2f") + ("x" if r["speedup_vs_torch"] else "")]
        if has_base:
            vs = r.get("speedup_vs_baseline")
            cells += [_fmt(vs, ".3f") + ("x" if vs else "")]
        cells += [_check_cell(r)]
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h)
              for i, h in enumerate(headers)]
    left = {"case", "dtype", "mode", "provider", "check"}

    def render(cells):
        return "  ".join(c.ljust(w) if h in left else c.rjust(w)
                         for c, w, h in zip(cells, widths, headers)).rstrip()

    out = [render(headers), render(["-" * w for w in widths])]
    out += [render(c) for c in lines]
    return "\n".join(out)


def header(meta: dict) -> str:
    return (f"nllfused-bench {','.join(meta['presets'])} on {meta['device']} | torch "
            f"{meta['torch']} | triton {meta['triton'] or 'none'} | commit {meta['git_commit']} "
            f"| {meta['date']}\n"
            f"copy bandwidth (read+write, same run): {meta['copy_gbps']:.1f} GB/s"
            + (f" | pages: {meta['pages']}" if meta.get("pages") else ""))


def footer(meta: dict, notes: list, rows: list) -> str:
    lines = [
        "GB/s = floor bytes / time: fwd 1 x P, fwd_bwd 3 x P, P = bytes of the logits "
        "(docs/maths.md, 'Bytes'; probability targets, 'soft': 2 x P, 5 x P); %copy = that over "
        "the copy bandwidth.",
        f"time: {meta['timing_method']}.",
        f"peak MB: memory above the inputs, {meta['memory_method']}; fwd_bwd includes the "
        "gradient it returns" + ("; work MB: peak MB less those gradients (the working memory "
                                 "a fused kernel can save)." if any(
                                     r["kind"] == "linear" for r in rows) else "."),
        f"check: worst relative error of loss and gradients against float64 torch; "
        f"{meta['inputs']}.",
    ]
    lines += [f"note: {n}" for n in notes]
    failures, not_applicable = {}, {}
    for r in ordered(rows):
        if r["status"] in ("wrong", "error", "oom"):
            key = (r["status"], r["provider"], r["case"], r["dtype"], r["note"])
            failures.setdefault(key, []).append(r["mode"])
        elif r["status"] == "n/a":
            not_applicable.setdefault((r["provider"], r["note"]), None)
    for (status, provider, case, dtype, note), modes in failures.items():
        lines.append(f"{status}: {provider} {case} {dtype} {','.join(modes)}: {note}")
    for provider, note in not_applicable:
        lines.append(f"n/a: {provider}: {note}")
    return "\n".join(dict.fromkeys(lines))


def write_csv(path: str, rows: list, meta: dict) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS) + list(META_COLUMNS))
        writer.writeheader()
        for r in ordered(rows):
            writer.writerow({**r, **{k: meta.get(k) for k in META_COLUMNS}})


def _json_value(value):
    """value with every non-finite float (a wrong provider's NaN error) as None: NaN and
    Infinity are not JSON, and strict readers (jq, JavaScript) refuse a file holding them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def write_json(path: str, rows: list, meta: dict, notes: list) -> None:
    data = _json_value({"meta": meta, "notes": notes, "results": ordered(rows)})
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str, allow_nan=False)
        f.write("\n")


def write_plots(out_dir: str, rows: list, meta: dict) -> tuple:
    """(paths written, note or None). Needs matplotlib (pip install matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 (missing or broken: plots are optional)
        return [], "plots skipped: matplotlib is not installed (pip install matplotlib)"
    rows = [r for r in ordered(rows) if r["status"] == "ok" and r["time_ms"]]
    if not rows:
        return [], "plots skipped: no timed results"
    title = f"{meta['device']} | torch {meta['torch']} | {meta['git_commit']} | {meta['date']}"
    paths = [_speed_plot(plt, os.path.join(out_dir, "speed.png"), rows, meta, title),
             _memory_plot(plt, os.path.join(out_dir, "memory.png"), rows, title)]
    return paths, None


def _groups(rows: list, key) -> dict:
    groups = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return groups


def _grid(plt, count: int, width: float = 6.5, height: float = 3.8):
    cols = min(2, count)
    nrows = math.ceil(count / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(width * cols, height * nrows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _speed_plot(plt, path: str, rows: list, meta: dict, title: str) -> str:
    # One panel per kind x mode x dtype; x: the cases in run order (N, then C, growing);
    # y: GB/s for cross-entropy (with the copy bandwidth as the ceiling), ms for linear + CE.
    groups = _groups(rows, lambda r: (r["kind"], r["mode"], r["dtype"]))
    label = case_labels(rows)
    fig, axes = _grid(plt, len(groups))
    for ax, ((kind, mode, dtype), group) in zip(axes, groups.items()):
        cases = list(dict.fromkeys((r["preset"], r["case"]) for r in group))
        metric, ylabel = ("gbps", "GB/s (floor bytes / time)") if kind == "ce" else (
            "time_ms", "time (ms)")
        for provider, prow in _groups(group, lambda r: r["provider"]).items():
            by_case = {(r["preset"], r["case"]): r[metric] for r in prow}
            xs = [i for i, c in enumerate(cases) if c in by_case]
            ax.plot(xs, [by_case[cases[i]] for i in xs], marker="o", label=provider)
        if kind == "ce":
            ax.axhline(meta["copy_gbps"], color="grey", linestyle="--", linewidth=1,
                       label="copy bandwidth")
        _label_axes(ax, [label[c] for c in cases], ylabel, kind, mode, dtype, grid_axis="both")
    return _save(plt, fig, path, title)


def _memory_plot(plt, path: str, rows: list, title: str) -> str:
    # Peak memory above the inputs per provider, for each case (fwd_bwd where measured).
    chosen = [r for r in rows if r["mode"] == "fwd_bwd"] or rows
    groups = _groups([r for r in chosen if r["peak_mem_bytes"] is not None],
                     lambda r: (r["kind"], r["mode"], r["dtype"]))
    label = case_labels(rows)
    fig, axes = _grid(plt, max(1, len(groups)))
    for ax, ((kind, mode, dtype), group) in zip(axes, groups.items()):
        cases = list(dict.fromkeys((r["preset"], r["case"]) for r in group))
        providers = list(dict.fromkeys(r["provider"] for r in group))
        width = 0.8 / len(providers)
        for j, provider in enumerate(providers):
            by_case = {(r["preset"], r["case"]): r["peak_mem_bytes"] / 1e6 for r in group
                       if r["provider"] == provider}
            xs = [i for i, c in enumerate(cases) if c in by_case]
            ax.bar([x + (j - (len(providers) - 1) / 2) * width for x in xs],
                   [by_case[cases[x]] for x in xs], width=width, label=provider)
        _label_axes(ax, [label[c] for c in cases], "peak MB above inputs", kind, mode, dtype,
                    grid_axis="y")
    return _save(plt, fig, path, title)


def _label_axes(ax, cases, ylabel, kind, mode, dtype, grid_axis):
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{'cross-entropy' if kind == 'ce' else 'linear + CE'} {mode} {dtype}",
                 fontsize=10)
    ax.grid(axis=grid_axis, alpha=0.3)
    ax.legend(fontsize=7)


def _save(plt, fig, path: str, title: str) -> str:
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_data(out_dir: str, rows: list, meta: dict, notes: list) -> None:
    """results.csv and results.json (also written after each case, so that a run stopped
    half-way leaves what it measured)."""
    os.makedirs(out_dir, exist_ok=True)
    write_csv(os.path.join(out_dir, "results.csv"), rows, meta)
    write_json(os.path.join(out_dir, "results.json"), rows, meta, notes)


def write_all(out_dir: Optional[str], rows: list, meta: dict, notes: list,
              plots: bool = True) -> list:
    """Write results.csv, results.json and the plots into out_dir; returns notes to print."""
    if not out_dir:
        return []
    os.makedirs(out_dir, exist_ok=True)
    paths, plot_note = write_plots(out_dir, rows, meta) if plots else ([], None)
    for stale in {os.path.join(out_dir, name) for name in PLOTS} - set(paths):
        if os.path.isfile(stale):  # a plot of an earlier run into the folder, not of this one
            os.remove(stale)
    write_data(out_dir, rows, meta, notes + ([plot_note] if plot_note else []))
    written = ["results.csv", "results.json"] + [os.path.basename(p) for p in paths]
    out = [f"written to {out_dir}: {', '.join(written)}"]
    return out + ([plot_note] if plot_note else [])
