"""NIXL transport (UCX backend): one-sided READs (pull) and WRITEs with a notification (push).

At ``register`` the whole KV tensor is registered once (DRAM for a CPU tensor, VRAM for a CUDA one)
and a block-granular local descriptor list (one descriptor per block) is prepared once. The first
transfer with a peer loads its agent metadata and prepares its block-granular remote list; both are
cached until ``disconnect``/``close`` or the peer's endpoint fails. A transfer selects blocks by index
from the two prepared lists; NIXL merges indices that are contiguous on both sides into one
descriptor (the same runs as ``merge_runs``; with ``capture_telemetry`` the result reports NIXL's own
descriptor count).

A push is a WRITE whose notification (``tandem-kv|<transfer id>|<digest>``) reaches the destination's
agent after the data; a thread there completes the matching ``expect``ed transfer. On an H200, UCX
WRITEs into the other process's VRAM run at copy speed while READs fall back to a slow path: see
``default_table.json``.

Failures stay with their transfer: a timeout cancels that transfer's handle only. A failed endpoint
(state ERR) drops the peer's cached state for the next transfer; transfers still using it finish first.

Re-registration (a parked worker's cache comes back at a new address): ``release`` releases the
local descriptor list, deregisters the memory and has every peer on this machine that loaded our
agent drop it, answered once dropped, so the old allocation is really freed; ``register`` registers
the new tensor under the next ``epoch``, whose agent metadata carries the new registration. A peer
that sees a newer epoch drops the agent it loaded (once no transfer uses it; until then the
transfer fails, and the caller recomputes) and loads the new metadata; an older epoch than it knows
is stale, refused.

Why the peers must be told: on one machine UCX moves VRAM through CUDA IPC, and the importer's
mapping of our allocation keeps its memory allocated after we free it. A peer on this machine that
loads our agent says so (``loaded`` over our channel server, naming the epoch it loaded: one at
another registration, or released, is refused and the transfer fails); ``release`` sends each such
peer ``unload``. UCX keeps what it mapped in a per-process cache until the process exits (the rkey
of the first agent loaded from a GPU holds its mapping until the agent is removed), so agents are
created with that cache off (``UCX_CUDA_IPC_CACHE=n`` unless the environment sets it): a transfer
maps the destination's allocation and unmaps it when done, and removing an agent leaves nothing
mapped. Peers on other machines reach us through the network (registered memory, nothing mapped):
they are not told.

UCX picks its devices from the environment: ``UCX_NET_DEVICES=lo`` keeps a test on loopback.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import types
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kv_transfer import metrics
from kv_transfer.base import KVTransport, PeerMetadata, host_id
from kv_transfer.channel import ChannelClient, ChannelServer, Stream
from kv_transfer.errors import TransferError, TransferTimeoutError, TransportClosedError
from kv_transfer.layout import BlockRun, KVLayout

logger = logging.getLogger(__name__)

_LOCAL = "NIXL_INIT_AGENT"  # prep_xfer_dlist's name for "the initiator's own memory"
_MAX_POLL_SLEEP_S = 1e-3
_MAX_NOTIF_SLEEP_S = 2e-4


def _block_descs(base_addr: int, num_blocks: int, bytes_per_block: int, device_id: int) -> np.ndarray:
    """One (address, length, device id) row per block: the block-granular descriptor list."""
    addrs = base_addr + np.arange(num_blocks, dtype=np.uint64) * np.uint64(bytes_per_block)
    descs = np.empty((num_blocks, 3), dtype=np.uint64)
    descs[:, 0] = addrs
    descs[:, 1] = bytes_per_block
    descs[:, 2] = device_id
    return descs


_AGENT_LOCK = threading.Lock()


def _make_agent(
    name: str, backends: tuple[str, ...], ucx_devices: str, capture_telemetry: bool, progress_delay_us: int
) -> Any:
    """A ``nixl_agent`` with ``backends``, UCX on ``ucx_devices``, and a progress thread that sleeps.

    Two things the ``nixl`` package does not let us set are set here, under a lock:
    - UCX's network devices. UCX reads ``UCX_NET_DEVICES`` when a backend is created; the UCX plugin's
      own ``ucx_devices`` parameter still left a listener on every interface (seen with 1.5.1), so
      the variable is set for the duration of the backend's creation and then restored.
    - UCX's CUDA IPC mapping cache (``UCX_CUDA_IPC_CACHE``): off where CUDA is, unless the environment
      sets it (see the module's docstring: a cached mapping of a peer's cache outlives its release).
    - The progress thread's delay. ``nixl_agent`` hardcodes it to 0, and the UCX backend then polls
      its workers with a zero timeout: a core busy per agent even when nothing moves (measured here:
      ~2 s of CPU per 3 idle seconds; with 1000 us, ~0.06 s). The delay is only the poll() timeout
      between event-driven wakeups, so transfers are as fast. While the agent is built, ``nixl._api``
      sees a bindings module whose agent config raises the delay to ``progress_delay_us``. (The
      thread itself is needed: the owner side must answer UCX wireup without being called.)
    """
    import nixl._api as api
    from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

    config = nixl_agent_config(
        backends=[],  # created below, once UCX_NET_DEVICES is in place
        capture_telemetry=capture_telemetry,
        # pull_async runs pulls on several threads at once: the agent must lock itself.
        sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
    )
    bindings = getattr(api, "nixlBind", None)
    patched = None
    if progress_delay_us > 0 and bindings is not None and hasattr(bindings, "nixlAgentConfig"):

        class _AgentConfig(bindings.nixlAgentConfig):  # type: ignore[name-defined,misc]
            def __setattr__(self, key: str, value: Any) -> None:
                if key == "pthrDelay":
                    value = max(int(value), progress_delay_us)
                super().__setattr__(key, value)

        class _Bindings(types.ModuleType):
            def __getattr__(self, key: str) -> Any:
                return getattr(bindings, key)

        patched = _Bindings(bindings.__name__)
        patched.nixlAgentConfig = _AgentConfig  # type: ignore[attr-defined]

    with _AGENT_LOCK:
        saved = {k: os.environ.get(k) for k in ("UCX_NET_DEVICES", "UCX_CUDA_IPC_CACHE")}
        os.environ["UCX_NET_DEVICES"] = ucx_devices
        if torch.cuda.is_available():  # (elsewhere nothing reads it, and UCX warns of an unused variable)
            os.environ.setdefault("UCX_CUDA_IPC_CACHE", "n")
        try:
            if patched is not None:
                api.nixlBind = patched
            try:
                agent = nixl_agent(name, config)
            finally:
                api.nixlBind = bindings
            for backend in backends:
                if backend not in agent.plugin_list:
                    raise RuntimeError(f"NIXL backend {backend} unavailable; plugins: {agent.plugin_list}")
                agent.create_backend(backend)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    return agent


@dataclass
class _Peer:
    agent_name: str
    dlist: Any  # nixl_prepped_dlist_handle over all the peer's blocks
    epoch: int = 0  # of the peer's registration it describes
    users: int = 0  # transfers using it now
    dropped: bool = False  # no longer cached: released when the last user is done


_NOTIF_PREFIX = b"tandem-kv|"
_CONTROL_TIMEOUT_S = 5.0  # a peer's answer to ``loaded`` (first transfer with it) or ``unload`` (release)


class NixlTransport(KVTransport):
    """Pulls with NIXL READs, pushes with NIXL WRITEs. Requires the ``nixl`` package."""

    transport_name = "nixl"
    reregister_refusal = ""

    def __init__(
        self,
        *,
        backends: tuple[str, ...] = ("UCX",),
        ucx_devices: str | None = None,
        progress_delay_us: int = 1000,
        capture_telemetry: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        model: str = "",
    ) -> None:
        """``ucx_devices``: UCX network devices, e.g. "mlx5_0:1,lo" or "all"; by default ``UCX_NET_DEVICES``
        when set, else "lo" (one machine, like the tcp transport's 127.0.0.1 default).
        ``progress_delay_us``: the progress thread's idle wait (0 = busy-poll a core; see ``_make_agent``).
        ``capture_telemetry``: report NIXL's own descriptor count in ``TransferResult``.
        ``host``/``port``: the channel server where peers on this machine say they loaded our agent
        (and are told to drop it at ``release``).
        """
        super().__init__(model=model)
        try:
            import nixl  # noqa: F401  (selects the installed nixl_cuXX wheel and fills nixl._api)
            from nixl import _bindings
        except ImportError as e:
            raise ImportError(
                "the nixl KV transport needs the `nixl` package; on a CPU machine install it without "
                "its torch dependency: pip install --no-deps nixl nixl-cu12"
            ) from e
        if not os.environ.get("NIXL_LOG_LEVEL"):
            logging.getLogger("nixl").setLevel(logging.WARNING)  # its INFO lines go to stdout
        self._errors: tuple[type[BaseException], ...] = tuple(
            v for v in vars(_bindings).values() if isinstance(v, type) and issubclass(v, Exception)
        )
        if ucx_devices is None:
            ucx_devices = os.environ.get("UCX_NET_DEVICES") or "lo"
        self._agent: Any = _make_agent(self.name, backends, ucx_devices, capture_telemetry, progress_delay_us)
        self._capture_telemetry = capture_telemetry
        self._peers: dict[str, _Peer] = {}
        self._reg_descs: Any = None
        self._local_dlist: Any = None
        self._mem_type = "DRAM"
        self._device_id = 0
        self._notif_thread: threading.Thread | None = None
        self._host, self._port = host, port
        self._server: ChannelServer | None = None
        self._client = ChannelClient()
        self._loaders_lock = threading.Lock()  # not ``_lock``: ``_add_peer`` holds that while it asks a peer
        self._loaders: dict[str, tuple[str, int]] = {}  # peers that loaded our agent: name -> channel address
        self.num_notif_polls = 0  # reads of the agent's notifications (what the notifications thread costs)

    def _register(self, kv: torch.Tensor, layout: KVLayout) -> None:
        self._mem_type = "DRAM" if kv.device.type == "cpu" else "VRAM"
        self._device_id = kv.device.index or 0
        self._reg_descs = self._agent.register_memory(kv)
        descs = _block_descs(kv.data_ptr(), layout.num_blocks, layout.bytes_per_block, self._device_id)
        self._local_dlist = self._agent.prep_xfer_dlist(_LOCAL, descs, self._mem_type)
        self._notif_thread = threading.Thread(target=self._notif_loop, name=f"{self.name}-notifs", daemon=True)
        self._notif_thread.start()
        self._server = ChannelServer(self.name, self._host, self._port, self._handle_message, _CONTROL_TIMEOUT_S)

    def _reregister(self, kv: torch.Tensor, layout: KVLayout) -> None:
        self._reg_descs = self._agent.register_memory(kv)
        descs = _block_descs(kv.data_ptr(), layout.num_blocks, layout.bytes_per_block, self._device_id)
        self._local_dlist = self._agent.prep_xfer_dlist(_LOCAL, descs, self._mem_type)

    def _deregister(self) -> None:
        try:
            if self._local_dlist is not None:
                self._local_dlist.release()
            if self._reg_descs is not None:
                self._agent.deregister_memory(self._reg_descs)
        except self._errors as e:
            logger.warning("%s: releasing NIXL registrations: %s", self.name, e)
        self._local_dlist = self._reg_descs = None

    def _release(self) -> None:
        """Deregister the cache; every peer on this machine that loaded our agent drops it (answered)."""
        self._deregister()
        with self._loaders_lock:
            loaders, self._loaders = dict(self._loaders), {}
        deadline = time.perf_counter() + _CONTROL_TIMEOUT_S
        for name, (host, port) in loaders.items():
            message = {"op": "unload", "name": name, "peer": self.name, "epoch": self._epoch}
            try:
                self._ask(name, host, port, message, deadline)
            except TransferError as e:  # gone, or slow: its mapping keeps the old allocation until it drops it
                logger.warning("%s: %s did not drop our NIXL agent: %s", self.name, name, e)

    def _describe(self) -> tuple[dict[str, Any], bytes]:
        assert self._server is not None
        address = {"base_addr": self.kv.data_ptr(), "device_id": self._device_id, "mem_type": self._mem_type,
                   "control_host": self._host, "control_port": self._server.port}
        return address, self._agent.get_agent_metadata()

    # The control channel: peers on this machine that loaded our agent, told to drop it at release.

    def _ask(self, peer: str, host: str, port: int, message: dict[str, Any], deadline: float) -> None:
        """Send ``message`` to ``peer``'s channel server and wait for its answer; ``TransferError``
        when it refuses, is unreachable, or does not answer before ``deadline``."""
        self._client.ask(host, port, peer, message, deadline, "NIXL")

    def _tell_loaded(self, peer: PeerMetadata) -> None:
        """We loaded ``peer``'s agent: a peer on this machine records us (to have us drop it at its
        release) and refuses when its registration is not the one we loaded (stale metadata)."""
        if peer.host != host_id() or "control_port" not in peer.address or self._server is None:
            return
        message = {"op": "loaded", "name": peer.name, "epoch": peer.epoch,
                   "by": {"name": self.name, "host": self._host, "port": self._server.port}}
        self._ask(peer.name, str(peer.address["control_host"]), int(peer.address["control_port"]), message,
                  time.perf_counter() + _CONTROL_TIMEOUT_S)

    def _refusal(self, epoch: Any) -> str:
        """Why a peer that loaded our registration ``epoch`` is refused, or "". Read without ``_lock``
        (a peer's ``_add_peer`` may hold its own while it asks us, and ours while we ask it)."""
        released, current = self._released, self._epoch
        if released or epoch != current:
            return (f"loaded registration {epoch} of {self.name!r}, which is at {current}"
                    + (" and released (parked)" if released else ""))
        return ""

    def _handle_message(self, stream: Stream, request: dict[str, Any]) -> None:
        op = request.get("op")
        if op not in ("loaded", "unload") or request.get("name") != self.name:
            stream.send_message({"ok": False, "error": f"unexpected message for {self.name!r}: op {op!r} "
                                                       f"for {request.get('name')!r}"})
            return
        if op == "unload":  # the peer released its cache: drop its agent (transfers using it finish first)
            self._drop_peer(str(request["peer"]), int(request["epoch"]))
            stream.send_message({"ok": True})
            return
        by, epoch = request["by"], request.get("epoch")
        refused = self._refusal(epoch)
        if not refused:
            with self._loaders_lock:
                self._loaders[str(by["name"])] = (str(by["host"]), int(by["port"]))
            refused = self._refusal(epoch)  # released meanwhile: ``_release`` may have missed it
            if refused:
                with self._loaders_lock:
                    self._loaders.pop(str(by["name"]), None)
        if refused:
            stream.send_message({"ok": False, "error": refused})
            return
        stream.send_message({"ok": True})

    def _connect(self, peer: PeerMetadata) -> None:
        self._release_peer(self._acquire(peer))

    def _acquire(self, peer: PeerMetadata) -> _Peer:
        """The peer's cached state (set up on first use), counted as used until ``_release_peer``."""
        stale: _Peer | None = None
        with self._lock:
            known = self._peers.get(peer.name)
            if known is not None and known.epoch != peer.epoch:
                if peer.epoch < known.epoch:
                    raise TransferError(f"stale metadata of NIXL peer {peer.name!r}: its registration {peer.epoch}, "
                                        f"we loaded its newer {known.epoch}")
                if known.users:
                    raise TransferError(f"NIXL peer {peer.name!r} registered its cache again while transfers with "
                                        "its old registration are in flight")
                stale = self._peers.pop(peer.name)  # it re-registered: load its new metadata
                stale.dropped = True
                known = None
            if stale is not None:
                self._free(stale)
            if known is None:
                known = self._peers[peer.name] = self._add_peer(peer)
                known.epoch = peer.epoch
            known.users += 1
            return known

    def _release_peer(self, peer: _Peer) -> None:
        with self._lock:
            peer.users -= 1
            free = peer.dropped and peer.users == 0
        if free:
            self._free(peer)

    def _add_peer(self, peer: PeerMetadata) -> _Peer:
        try:
            agent_name = self._agent.add_remote_agent(peer.blob)
            if isinstance(agent_name, bytes):  # the bindings return the name as bytes
                agent_name = agent_name.decode()
        except self._errors as e:
            raise TransferError(f"cannot reach NIXL peer {peer.name!r}: {e}") from e
        if agent_name != peer.name:
            self._agent.remove_remote_agent(agent_name)
            raise TransferError(f"NIXL metadata names agent {agent_name!r}, expected {peer.name!r}")
        try:
            descs = _block_descs(
                int(peer.address["base_addr"]),
                peer.layout.num_blocks,
                peer.layout.bytes_per_block,
                int(peer.address["device_id"]),
            )
            dlist = self._agent.prep_xfer_dlist(agent_name, descs, str(peer.address["mem_type"]))
        except (*self._errors, KeyError, ValueError) as e:
            self._agent.remove_remote_agent(agent_name)
            raise TransferError(f"cannot describe NIXL peer {peer.name!r}'s blocks: {e}") from e
        try:
            self._agent.make_connection(agent_name)  # start UCX wireup now, not in the first transfer
        except self._errors as e:
            dlist.release()
            self._agent.remove_remote_agent(agent_name)
            raise TransferError(f"cannot connect to NIXL peer {peer.name!r}: {e}") from e
        try:
            self._tell_loaded(peer)
        except TransferError:
            self._free(_Peer(agent_name, dlist))
            raise
        metrics.record_connect(self.transport_name)
        return _Peer(agent_name, dlist)

    def _disconnect(self, peer_name: str) -> None:
        self._drop_peer(peer_name)

    def _drop_peer(self, peer_name: str, up_to_epoch: int | None = None) -> None:
        """Forget the peer's agent (of a registration up to ``up_to_epoch``, when given); it is removed
        once no transfer uses it."""
        with self._lock:
            peer = self._peers.get(peer_name)
            if peer is None or (up_to_epoch is not None and peer.epoch > up_to_epoch):
                return
            del self._peers[peer_name]
            peer.dropped = True
            free = peer.users == 0
        if free:
            self._free(peer)

    def _free(self, peer: _Peer) -> None:
        for release in (peer.dlist.release, lambda: self._agent.remove_remote_agent(peer.agent_name)):
            try:
                release()
            except self._errors as e:
                logger.warning("%s: dropping NIXL peer %s: %s", self.name, peer.agent_name, e)

    def _pull(self, peer: PeerMetadata, runs: list[BlockRun], deadline: float) -> int:
        return self._xfer("READ", peer, runs, deadline, b"")

    def _push(self, peer: PeerMetadata, transfer_id: str, digest: str, runs: list[BlockRun], deadline: float) -> int:
        notif = _NOTIF_PREFIX + f"{transfer_id}|{digest}|{len(runs)}".encode()
        if runs:
            return self._xfer("WRITE", peer, runs, deadline, notif)
        remote = self._acquire(peer)  # nothing to write: the notification alone
        try:
            self._agent.send_notif(remote.agent_name, notif)
        except self._errors as e:
            raise TransferError(f"NIXL notification to {peer.name!r} failed: {e}") from e
        finally:
            self._release_peer(remote)
        return 0

    def _xfer(self, op: str, peer: PeerMetadata, runs: list[BlockRun], deadline: float, notif: bytes) -> int:
        if time.perf_counter() >= deadline:  # never start past the deadline (a push: the destination's too)
            raise TransferTimeoutError(f"NIXL {op} with {peer.name!r} not started: the deadline passed")
        remote = self._acquire(peer)
        try:
            return self._xfer_with(op, peer, remote, runs, deadline, notif)
        finally:
            self._release_peer(remote)

    def _xfer_with(
        self, op: str, peer: PeerMetadata, remote: _Peer, runs: list[BlockRun], deadline: float, notif: bytes
    ) -> int:
        local_idx = np.concatenate([np.arange(r.local_start, r.local_start + r.num_blocks) for r in runs])
        remote_idx = np.concatenate([np.arange(r.remote_start, r.remote_start + r.num_blocks) for r in runs])
        try:
            handle = self._agent.make_prepped_xfer(
                op,
                self._local_dlist,
                local_idx.astype(np.int32),
                remote.dlist,
                remote_idx.astype(np.int32),
                notif_msg=notif,
            )
        except self._errors as e:
            self._disconnect(peer.name)
            raise TransferError(f"NIXL {op} with {peer.name!r} could not be created: {e}") from e
        try:
            state = self._wait(handle, deadline)
            if state == "DONE" and self._capture_telemetry:
                return int(self._agent.get_xfer_telemetry(handle).descCount)
        except self._errors as e:
            state = f"{type(e).__name__}: {e}"
        finally:
            try:
                handle.release()  # cancels a transfer still in flight
            except self._errors as e:
                logger.warning("%s: releasing a NIXL transfer handle: %s", self.name, e)
        if state == "DONE":
            return len(runs)
        if state == "CLOSED":
            raise TransportClosedError(f"NIXL {op} with {peer.name!r} stopped: the transport is closing")
        if state == "PROC":  # this transfer only: the peer stays connected for the others
            raise TransferTimeoutError(f"NIXL {op} with {peer.name!r} timed out")
        # The endpoint failed (the peer died or broke): the next transfer sets the peer up again.
        self._disconnect(peer.name)
        raise TransferError(f"NIXL {op} with {peer.name!r} failed: {state}")

    def _wait(self, handle: Any, deadline: float) -> str:
        """Post the transfer and poll it until DONE, ERR, the deadline (still PROC), or close (CLOSED)."""
        state = self._agent.transfer(handle)
        sleep_s = 0.0
        while state == "PROC":
            if time.perf_counter() >= deadline:
                return "PROC"
            if self._closing.is_set():  # one last look: a transfer that finished is not interrupted
                state = self._agent.check_xfer_state(handle)
                return "CLOSED" if state == "PROC" else str(state)
            time.sleep(sleep_s)
            sleep_s = min(max(2 * sleep_s, 2e-5), _MAX_POLL_SLEEP_S)
            state = self._agent.check_xfer_state(handle)
        return str(state)

    def _notif_loop(self) -> None:
        """Complete expected pushes as their notifications arrive (polls only while some are expected,
        not counting those expected ``ahead`` and not hurried: a handoff sent ahead waits through the
        owner's queue and prefill, ~5000 polls a second of a core-starved CPU worker's time). While
        only such pushes are expected it still looks every 0.5 s: a landing nobody hurried is late,
        never lost."""
        sleep_s = 0.0
        while not self._closing.is_set():
            if not self._inbox.pending():
                sleep_s = 0.0
                if self._inbox.wait_for_pending(0.5) or not self._inbox.pending(ahead=True):
                    continue
            self.num_notif_polls += 1
            try:
                notifs = self._agent.get_new_notifs()
            except self._errors as e:
                logger.warning("%s: reading NIXL notifications: %s", self.name, e)
                notifs = {}
            got = False
            for messages in notifs.values():
                for message in messages:
                    got = True
                    self._on_notif(bytes(message))
            sleep_s = 0.0 if got else min(max(2 * sleep_s, 1e-5), _MAX_NOTIF_SLEEP_S)
            time.sleep(sleep_s)

    def _on_notif(self, message: bytes) -> None:
        if not message.startswith(_NOTIF_PREFIX):
            logger.info("%s: ignoring a NIXL notification %r", self.name, message[:64])
            return
        try:
            transfer_id, digest, num_runs = message[len(_NOTIF_PREFIX) :].decode().split("|")
            self._inbox.complete(transfer_id, digest, int(num_runs))
        except ValueError:
            logger.warning("%s: malformed NIXL notification %r", self.name, message[:64])

    def _interrupt(self) -> None:
        self._client.close()
        if self._server is not None:
            self._server.close()

    def _close(self) -> None:
        if self._notif_thread is not None:
            self._notif_thread.join(timeout=2.0)
        with self._lock:
            peers, self._peers = list(self._peers.values()), {}
        for peer in peers:
            peer.dropped = True
            if peer.users == 0:  # else a transfer outlived close's grace: leave its state alone
                self._free(peer)
        self._deregister()
        self._agent = None  # destroys the agent: its UCX workers and progress thread
