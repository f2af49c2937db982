"""The environment record stored in every harness output: what ran, where, when."""

from __future__ import annotations

import datetime
import platform
import socket
import subprocess
from pathlib import Path

import torch


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[3]  # src/qflash/bench -> repository root
    try:
        res = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:
        return None
    version = getattr(mod, "__version__", None)
    if version is None:
        from importlib import metadata

        try:
            version = metadata.version(module)
        except metadata.PackageNotFoundError:  # imported from a source/build folder on sys.path
            version = f"no package metadata, from {getattr(mod, '__path__', ['?'])[0]}"
    return version


def collect_env(device: torch.device) -> dict:
    """A dict with ``schema.ENV_KEYS``: date (UTC, ISO 8601), versions, GPU, git revision."""
    from .. import __version__

    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "platform": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "device": str(device),
        "gpu_name": gpu_name,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cpu_threads": torch.get_num_threads(),
        "git_revision": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "qflash": __version__,
        "sageattention": _version("sageattention"),
    }
