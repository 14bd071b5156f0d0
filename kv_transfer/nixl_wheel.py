"""Which NIXL wheel fits this machine: ``nixl-cu13`` where CUDA is 13, ``nixl-cu12`` elsewhere
(CUDA 12, or no GPU: the CPU machines of CI). The Makefile runs this file as a script."""

from __future__ import annotations

import re
import shutil
import subprocess


def wheel_for(cuda_version: str | None) -> str:
    """The NIXL wheel for a CUDA version string such as "13.0" (None: no CUDA)."""
    major = (cuda_version or "").split(".")[0]
    return "nixl-cu13" if major == "13" else "nixl-cu12"


def cuda_version() -> str | None:
    """torch's CUDA version; without a CUDA torch, the driver's (nvidia-smi), else None."""
    try:
        import torch

        if torch.version.cuda:
            return str(torch.version.cuda)
    except ImportError:
        pass
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"CUDA Version:\s*([0-9.]+)", out)
    return found.group(1) if found else None


if __name__ == "__main__":
    print(wheel_for(cuda_version()))
