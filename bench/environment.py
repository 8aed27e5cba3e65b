"""What a result was measured on: device, versions, git commit, date."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{model} ({threads} thread{'s' if threads != 1 else ''})"


def cpu_pages() -> str:
    """The pages torch's CPU tensors get: the kernel's transparent-huge-page mode and whether
    torch asks for huge pages (its THP_MEM_ALLOC_ENABLE=1, which madvises its large
    allocations). On a VM a 4 KiB page's TLB miss is a two-level walk: a stream over 4 KiB
    pages can read markedly slower than over 2 MiB ones, the copy bandwidth as well."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = next((w[1:-1] for w in f.read().split() if w.startswith("[")), "unknown")
    except OSError:
        mode = "unknown"
    torch_thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "") == "1"
    huge = mode == "always" or (mode == "madvise" and torch_thp)
    return (f"{'2 MiB' if huge else '4 KiB'} (THP {mode}, THP_MEM_ALLOC_ENABLE="
            f"{'1' if torch_thp else 'unset'})")


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", REPO_DIR, *args], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def git_commit() -> str:
    """Short commit of the source tree the bench runs from, '+dirty' if files differ from it.
    NLLFUSED_GIT_COMMIT overrides it (a copy of the tree without .git, e.g. on a GPU box)."""
    if os.environ.get("NLLFUSED_GIT_COMMIT"):
        return os.environ["NLLFUSED_GIT_COMMIT"]
    commit = _git("rev-parse", "--short=12", "HEAD")
    if not commit:
        return "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return commit + ("+dirty" if dirty else "")


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 (missing or broken: recorded as absent)
        out["triton"] = None
    try:
        import nllfused
        out["nllfused"] = nllfused.__version__
        out["nllfused_build"] = nllfused.build_info()
    except Exception as exc:  # noqa: BLE001
        out["nllfused"] = f"import failed: {exc}"
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def describe(device: torch.device) -> dict:
    info = {
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if device.type == "cpu":
        info["pages"] = cpu_pages()
    info.update(versions())
    return info
