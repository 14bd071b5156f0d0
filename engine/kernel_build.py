"""Building the CPU kernels' extension (``engine/csrc``): the compiler flags, the hash of the
sources a build came from, and a build into a cache directory for a tree whose extension is
missing or stale (a worktree on ``PYTHONPATH``, a source change since ``pip install``).

Imports neither torch nor the engine: ``setup.py`` uses it to build the same extension.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("cpu_kernels.cpp",)
HEADERS = ("vec.h", "gemm.h", "norm_rope.h", "attention.h")
MODULE = "_cpu_kernels"
# -ffp-contract=off: no fused multiply-adds the source does not write, so every ISA tier does the
# same roundings; OpenMP from libgomp.so.1, which resolves to the copy torch has loaded.
COMPILE_ARGS = ["-O3", "-std=c++17", "-fopenmp", "-fPIC", "-ffp-contract=off", "-Wno-psabi"]
LINK_ARGS = ["-fopenmp"]


def source_hash() -> str:
    """A digest of the kernel sources and flags: an extension built from other sources is stale."""
    h = hashlib.sha256(" ".join(COMPILE_ARGS).encode())
    for name in (*SOURCES, *HEADERS):
        h.update(name.encode() + b"\0" + (CSRC / name).read_bytes())
    return h.hexdigest()[:16]


def hash_define(digest: str) -> str:
    return f'-DTANDEM_KERNELS_HASH="{digest}"'


def extension_filename() -> str:
    return MODULE + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def cache_root() -> Path:
    """tandem's cache directory: ``$TANDEM_CACHE_DIR``, else ``~/.cache/tandem`` (XDG)."""
    root = os.environ.get("TANDEM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tandem")
    return Path(root)


def cache_dir() -> Path:
    return cache_root() / "cpu_kernels"


def build_cached() -> Path:
    """The extension for the current sources, compiled into the cache directory once (a file lock
    keeps concurrent processes from building it twice). Raises RuntimeError when it cannot."""
    digest = source_hash()
    target_dir = cache_dir() / digest
    target = target_dir / extension_filename()
    if target.exists():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    with open(target_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            _compile(target, digest)
    return target


def _compile(target: Path, digest: str) -> None:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++ or g++) to build the CPU kernels with")
    include = sysconfig.get_paths()["include"]
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [cxx, *COMPILE_ARGS, hash_define(digest), f"-I{include}", "-shared",
               *(str(CSRC / s) for s in SOURCES), "-o", str(out), *LINK_ARGS]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building the CPU kernels failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
        os.replace(out, target)  # atomic: another process sees all of it or nothing
