"""nllfused-bench: time nllfused's cross-entropy against torch and other kernels.

    nllfused-bench                                  # quick preset (llm on a GPU), all providers
    nllfused-bench --device cuda --preset llm,vision --out bench/out
    nllfused-bench --preset cpu --providers torch,nllfused-cpu
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from . import cases as cases_mod
from . import environment, memory, providers, report, timing
from .progress import Progress
from .runner import Runner

EXIT_PROVIDER_FAILED = 3  # an nllfused provider was wrong or raised an error
MAX_THREADS = 1024  # beyond that OpenMP itself fails (it crashes at 100000)


def thread_count(text: str) -> int:
    count = int(text)
    if not 1 <= count <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"{count}: a thread count is 1 to {MAX_THREADS}")
    return count


def seconds(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text}: a time budget is a number of seconds above 0")
    return value


def check_out_dir(path: str) -> None:
    """Refuse an --out the results cannot be written to, before any case runs (a file, a
    folder below a file, no permission, one of the files it writes a folder)."""
    if not path:
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {path!r}: cannot create the folder ({exc.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path!r}: the folder is not writable")
    for name in ("results.csv", "results.json") + report.PLOTS:
        if os.path.isdir(os.path.join(path, name)):
            raise ValueError(f"--out {path!r}: {name} there is a folder")


def parse_args(argv):
    width = max(map(len, cases_mod.PRESET_HELP))
    parser = argparse.ArgumentParser(
        prog="nllfused-bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets:\n" + "\n".join(f"  {k:{width}}  {v}" for k, v in
                                         cases_mod.PRESET_HELP.items()))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: cuda when a GPU is visible, else cpu")
    parser.add_argument("--preset", default=None,
                        help="one or more presets, comma-separated (default: quick without a "
                             "GPU, llm with one)")
    parser.add_argument("--dtype", default=None,
                        help="dtypes, comma-separated, replacing the presets' (float32, "
                             "bfloat16, float16)")
    parser.add_argument("--providers", default=None,
                        help="providers, comma-separated (default: all available); "
                             f"known: {', '.join(providers.REGISTRY)}")
    parser.add_argument("--mode", default=None,
                        help="fwd, fwd_bwd or fwd,fwd_bwd (default: the preset's)")
    parser.add_argument("--out", default="bench/out",
                        help="folder for results.csv, results.json and plots (default: "
                             "bench/out; an empty string: write no files)")
    parser.add_argument("--baseline", default="torch", metavar="PROVIDER",
                        help="a second yardstick besides torch, one of --providers (e.g. "
                             "nllfused-cpu, to see what nllfused-stats costs over it): the "
                             "'vs <baseline>' column, on the CPU timed in pairs with it")
    parser.add_argument("--threads", type=thread_count, default=None,
                        help="torch CPU threads (default: 2 for the cpu preset, else torch's)")
    parser.add_argument("--time-budget", type=seconds, default=None, metavar="SECONDS",
                        help="start no new case after this many seconds (notes what was left)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-plots", action="store_true", help="no PNG plots")
    parser.add_argument("--list", action="store_true",
                        help="list the providers and whether they can run here, then exit")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def list_providers(device: torch.device) -> None:
    for name, provider in providers.REGISTRY.items():
        reason = provider.unavailable(device)
        kinds = [k for k in ("ce", "linear") if getattr(provider, k) is not None]
        state = "available" if reason is None else f"unavailable: {reason or 'other device'}"
        print(f"{name:15} {'+'.join(kinds):10} {state}  ({provider.description})")


def cpu_policy(presets: list) -> timing.CpuPolicy:
    if presets == ["smoke"]:
        return timing.SMOKE_CPU_POLICY
    if set(presets) <= {"quick", "smoke"}:
        return timing.QUICK_CPU_POLICY
    return timing.CpuPolicy()


def run_metadata(device, presets, chosen, copy_gbps, policy, argv) -> dict:
    meta = environment.describe(device)
    meta.update({
        "presets": presets, "providers": [p.name for p in chosen], "copy_gbps": copy_gbps,
        "timing_method": timing.method(device, policy), "memory_method": memory.method(device),
        "floor_bytes": ("fwd: 1 x P, fwd_bwd: 3 x P, P = numel(logits) x sizeof(dtype); "
                        "probability targets ('soft' cases): 2 x P, 5 x P"),
        "inputs": (f"targets are class indices with ~{cases_mod.IGNORED_FRACTION:.0%} "
                   f"ignore_index ('soft' cases: probabilities, a softmax of N(0, 2^2) logits), "
                   f"reduction mean, logits ~ N(0, 2^2)"),
        "argv": list(argv),
    })
    return meta


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.list:
        list_providers(device)
        return 0
    try:
        preset_names = (cases_mod.split_list(args.preset, "--preset")
                        or [cases_mod.default_preset(device)])
        presets = cases_mod.expand_presets(preset_names, device)
        cases = cases_mod.build_cases(preset_names, device, cases_mod.parse_dtypes(args.dtype),
                                      cases_mod.parse_modes(args.mode))
        requested = cases_mod.split_list(args.providers, "--providers")
        chosen, notes = providers.select(device, requested, {c.kind for c in cases}, presets)
    except ValueError as exc:
        print(f"nllfused-bench: {exc}", file=sys.stderr)
        return 2
    if not chosen:
        print("nllfused-bench: no provider can run these cases here", file=sys.stderr)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        return 2
    if args.baseline != "torch" and args.baseline not in [p.name for p in chosen]:
        print(f"nllfused-bench: --baseline {args.baseline} is not among the providers of this "
              f"run ({', '.join(p.name for p in chosen)})", file=sys.stderr)
        return 2
    try:  # last of the checks: it makes the folder
        check_out_dir(args.out)
    except ValueError as exc:
        print(f"nllfused-bench: {exc}", file=sys.stderr)
        return 2

    threads = args.threads
    if threads is None and device.type == "cpu" and "cpu" in presets:
        threads = 2
    if threads:
        torch.set_num_threads(threads)
    policy = cpu_policy(presets)
    copy_gbps = timing.copy_bandwidth_gbps(device, policy)
    meta = run_metadata(device, presets, chosen, copy_gbps, policy, argv)
    meta["baseline"] = args.baseline

    def save_partial(rows_so_far):
        report.write_data(args.out, [r.as_dict() for r in rows_so_far], meta,
                          notes + ["partial: the run had not finished"])

    progress = Progress(len(cases) * len(chosen), enabled=not args.no_progress)
    runner = Runner(device, chosen, policy, copy_gbps, progress, args.time_budget,
                    baseline=args.baseline)
    rows = [r.as_dict() for r in runner.run(cases, save_partial if args.out else None)]
    progress.close()
    notes += runner.notes

    written = report.write_all(args.out, rows, meta, notes, plots=not args.no_plots)
    print(report.header(meta))
    print()
    print(report.table(rows, args.baseline))
    print()
    print(report.footer(meta, notes + written, rows))
    failed = any(r["provider"].startswith("nllfused-") and r["status"] in ("wrong", "error")
                 for r in rows)
    return EXIT_PROVIDER_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
