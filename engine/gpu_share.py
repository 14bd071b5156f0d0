"""Decode priority between a prefill and a decode worker sharing one GPU, without MPS.

Each process on a GPU has its own CUDA context and the GPU time-slices between contexts: a decode
step launched while the prefill worker's forward runs took about three times its length (measured
on an H200, 8B model: 5.3 ms alone, 16 ms beside a 1024-token prefill). The first decode of a
handed-off request always meets the prefill of the next queued prompt, so the first-to-second-token
gap was 5x the inter-token latency.

The two processes cooperate through a 64-byte file in shared memory named after the GPU's UUID
(``/dev/shm/tandem-gpu-<uuid>``), two float64 seconds of ``CLOCK_MONOTONIC`` (one clock for every
process of a host):

- ``hold_until``: the decode worker (role ``decode``) writes it when it launches a decode-only step
  that carries a handed-off request's first decode (:meth:`GpuShare.hold`: the step and the one
  still running ahead of it, at most ``MAX_WAIT_S``), and zeroes it when that step's tokens are
  applied (:meth:`GpuShare.release`).
- ``decode_beat``: the decode worker's last step launch (:meth:`GpuShare.beat`).

The prefill worker (role ``prefill``), while a decode worker on its GPU has stepped within
``PEER_S``, runs a forward through a :class:`LayerGate`: at most ``DEPTH`` layers queued on the
device, and before launching a layer it waits while a hold is up, never past its ``hold_until`` nor
``MAX_WAIT_S``. So the held decode step runs alone after at most ``DEPTH`` prefill layers.

Workers on different GPUs open different files: nothing is held. On the CPU there is no file. The
gate changes when kernels are launched, never what they compute.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from pathlib import Path

import torch

_LAYOUT = struct.Struct("<dd")  # hold_until, decode_beat (time.monotonic seconds; 0: none)
_SIZE = 64
PEER_S = 5.0  # a decode worker that launched no step for this long no longer slows the prefill
MAX_WAIT_S = 0.02  # the longest hold, and a prefill layer's longest wait for one (a lost release costs no more)
DEPTH = 2  # prefill layers queued on the device while a decode worker shares the GPU
_POLL_S = 1e-4
ROLES = ("prefill", "decode")


def share_dir() -> Path:
    return Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(os.environ.get("TMPDIR", "/tmp"))


class GpuShare:
    """One process's view of its GPU's shared flag. ``role``: which side this process plays now
    (a worker that switches tiers sets it)."""

    def __init__(self, path: Path, role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"a GPU share role is one of {ROLES}, got {role!r}")
        self.path = path
        self.role = role
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < _SIZE:
                os.ftruncate(fd, _SIZE)  # zeroes: no hold, no decode worker seen
            self._map = mmap.mmap(fd, _SIZE)
        finally:
            os.close(fd)
        self._held = 0.0  # the hold_until this process wrote last (decode)
        self.num_holds = 0  # decode: holds announced
        self.num_waits = 0  # prefill: layer launches held back by a hold
        self.wait_s = 0.0  # prefill: their total wait

    @classmethod
    def for_device(cls, device: torch.device | str, role: str) -> GpuShare | None:
        """The share of a CUDA device; None elsewhere."""
        device = torch.device(device)
        if device.type != "cuda":
            return None
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        return cls(share_dir() / f"tandem-gpu-{uuid}", role)

    def _read(self) -> tuple[float, float]:
        return _LAYOUT.unpack_from(self._map, 0)

    # ---- the decode worker ---------------------------------------------------------------
    def beat(self) -> None:
        """A decode step is being launched (the prefill side throttles while these come)."""
        struct.pack_into("<d", self._map, 8, time.monotonic())

    def hold(self, for_s: float) -> None:
        """The step being launched should run alone for up to ``for_s`` from now."""
        self._held = time.monotonic() + for_s
        _LAYOUT.pack_into(self._map, 0, self._held, time.monotonic())
        self.num_holds += 1

    def release(self) -> None:
        """The held step is done. A hold another process wrote since is left alone."""
        if self._held and self._read()[0] == self._held:
            struct.pack_into("<d", self._map, 0, 0.0)
        self._held = 0.0

    # ---- the prefill worker --------------------------------------------------------------
    def decode_alive(self) -> bool:
        return self.role == "prefill" and time.monotonic() - self._read()[1] < PEER_S

    def wait_held(self) -> None:
        """Until no hold is up (bounded by the hold's own end and ``MAX_WAIT_S``)."""
        until = self._read()[0]
        now = time.monotonic()
        if until <= now:
            return
        start, deadline = now, min(until, now + MAX_WAIT_S)
        while now < deadline and self._read()[0] > now:
            time.sleep(_POLL_S)
            now = time.monotonic()
        self.num_waits += 1
        self.wait_s += now - start

    def gate(self, device: torch.device) -> LayerGate | None:
        """A forward's gate, or None when this process need not yield (a decode worker, or none alive)."""
        return LayerGate(self, device) if self.decode_alive() else None


class LayerGate:
    """Called before each layer of one forward: keeps ``DEPTH`` layers queued, then waits out a hold."""

    def __init__(self, share: GpuShare, device: torch.device) -> None:
        self.share = share
        self.events = [torch.cuda.Event() for _ in range(DEPTH)] if device.type == "cuda" else None

    def __call__(self, layer: int) -> None:
        if self.events is not None and layer > 0:
            self.events[(layer - 1) % DEPTH].record()  # the end of the layer launched last
            if layer >= DEPTH:
                self.events[layer % DEPTH].synchronize()  # layer - DEPTH is done on the device
        self.share.wait_held()
