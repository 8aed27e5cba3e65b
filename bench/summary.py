"""A compact table of a results.json: one line per case, one column per provider.

    python -m nllfused.bench.summary bench/results/<run>/results.json [--markdown]

Each cell: GB/s and speedup over torch (cross-entropy), or ms and speedup (linear + CE);
WRONG / oom / error / n/a where a provider has no time. --markdown prints the same as a
Markdown table (for the README).
"""
from __future__ import annotations

import argparse
import json
import sys

from .cases import MODES
from .report import case_labels, ordered


def _number(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def _cell(row) -> str:
    if row is None:
        return ""
    if row["status"] != "ok" or not row["time_ms"]:
        return {"wrong": "WRONG"}.get(row["status"], row["status"])
    value = _number(row["gbps"]) if row["gbps"] is not None else _number(row["time_ms"]) + "ms"
    speedup = row["speedup_vs_torch"]
    return value + (f" {speedup:.2f}x" if speedup is not None and row["provider"] != "torch"
                    else "")


def blocks(results: dict) -> list:
    """[(title, headers, lines)] per mode."""
    rows = ordered(results["results"])
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    out = []
    for mode in MODES:
        mode_rows = [r for r in rows if r["mode"] == mode]
        if not mode_rows:
            continue
        cases = list(dict.fromkeys((r["preset"], r["case"], r["dtype"]) for r in mode_rows))
        lines = []
        label = case_labels(mode_rows)
        for key in cases:
            by_provider = {r["provider"]: r for r in mode_rows
                           if (r["preset"], r["case"], r["dtype"]) == key}
            lines.append([label[key[:2]], key[2]] + [_cell(by_provider.get(p)) for p in providers])
        out.append((f"{mode}: GB/s (floor bytes / time) and speedup vs torch; linear + CE: ms",
                    ["case", "dtype"] + providers, lines))
    return out


def text(results: dict) -> str:
    meta = results["meta"]
    out = [f"{meta['device']} | torch {meta['torch']} | triton {meta.get('triton')} | commit "
           f"{meta['git_commit']} | {meta['date']} | copy {_number(meta['copy_gbps'])} GB/s"]
    for title, headers, lines in blocks(results):
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
        out.append("")
        out.append(title)
        for cells in [headers] + lines:
            out.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))).rstrip())
    for note in results.get("notes", []):
        if note.startswith("time budget"):
            out.append(f"note: {note}")
    wrong = sorted({f"{r['provider']} {r['case']} {r['dtype']}: {r['note']}"
                    for r in results["results"] if r["status"] in ("wrong", "error")})
    out += [f"FAILED {w}" for w in wrong]
    return "\n".join(out)


def markdown(results: dict) -> str:
    meta = results["meta"]
    out = [f"**{meta['device']}** · torch {meta['torch']} · triton {meta.get('triton')} · "
           f"commit `{meta['git_commit']}` · {meta['date']} · copy bandwidth "
           f"{_number(meta['copy_gbps'])} GB/s"]
    for title, headers, lines in blocks(results):
        out += ["", title, "", "| " + " | ".join(headers) + " |",
                "|" + "|".join("---" for _ in headers) + "|"]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nllfused.bench.summary",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("results_json")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    try:
        with open(args.results_json) as f:
            results = json.load(f)
    except OSError as exc:
        parser.error(f"{args.results_json}: {exc.strerror}")
    except ValueError as exc:  # json.JSONDecodeError, a UnicodeDecodeError
        parser.error(f"{args.results_json}: not a results.json ({exc})")
    if not (isinstance(results, dict) and {"meta", "results"} <= results.keys()):
        parser.error(f"{args.results_json}: not a results.json of nllfused-bench")
    print(markdown(results) if args.markdown else text(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
