"""GGUF weights dequantized once per machine: the float32 tensors ``GGUFFile.iter_weights`` gives,
kept in a safetensors file under ``<cache root>/weights`` (``engine.kernel_build.cache_root``).

Dequantizing the default model takes one to two seconds of CPU in every worker's start; reading
the cached file is a memory map. The file's name is a digest of the GGUF's bytes, of this
conversion's code (``engine/gguf_file.py``) and of the ``gguf`` package's version, so an edited
model or conversion never reads a stale file. A start that misses converts as before and writes
the file, one writer at a time (a file lock): a start that finds the lock taken only converts,
without holding every tensor for a write. A cache that cannot be written (read-only home, full
disk) is skipped with a warning: it only saves time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import math
import os
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import IO

import torch

from engine.gguf_file import GGUFFile
from engine.kernel_build import cache_root

log = logging.getLogger("tandem.engine")

# Larger float32 weights are dequantized on every start: their file would take much disk, and a
# start that misses holds every tensor until the file is written.
MAX_CACHED_BYTES = 2 << 30
_CONVERSION_SOURCE = Path(__file__).resolve().parent / "gguf_file.py"


def cache_path(gguf: GGUFFile) -> Path:
    h = hashlib.sha256()
    with open(gguf.path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    h.update(_CONVERSION_SOURCE.read_bytes())
    h.update(metadata.version("gguf").encode())
    return cache_root() / "weights" / f"{gguf.path.stem}-{h.hexdigest()[:20]}.safetensors"


def float32_bytes(gguf: GGUFFile) -> int:
    return 4 * sum(math.prod(t.dims) for t in gguf.header.tensors)


def iter_weights(gguf: GGUFFile) -> Iterator[tuple[str, torch.Tensor]]:
    """``gguf.iter_weights()``, from the cache where it holds them (in the file's tensor order)."""
    if os.environ.get("TANDEM_WEIGHT_CACHE", "1") == "0" or float32_bytes(gguf) > MAX_CACHED_BYTES:
        yield from gguf.iter_weights()
        return
    path = cache_path(gguf)
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for t in gguf.header.tensors:
                yield GGUFFile.hf_name(t.name), f.get_tensor(GGUFFile.hf_name(t.name))
        return
    writer = _writer_lock(path.parent)
    if writer is None:  # another process writes the file (or none can): convert as before
        yield from gguf.iter_weights()
        return
    with writer:
        weights = {}
        for name, tensor in gguf.iter_weights():
            weights[name] = tensor
            yield name, tensor
        if not path.exists():
            _write(path, weights)


def _writer_lock(directory: Path) -> IO[str] | None:
    """The cache directory's writer lock, taken (closing the file releases it); None when another
    process holds it or the directory cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = open(directory / ".lock", "w")  # noqa: SIM115 (the caller closes it)
    except OSError as e:
        log.warning("cannot cache the dequantized weights in %s: %s", directory, e)
        return None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


def _write(path: Path, weights: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(weights, str(tmp))
        os.replace(tmp, path)  # atomic: a reader sees all of it or nothing
    except OSError as e:
        log.warning("could not cache the dequantized weights in %s: %s", path.parent, e)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
