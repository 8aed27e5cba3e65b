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
    info.update(versions())
    return info
