"""Slow-loris clients and header floods against the router's HTTP edge, over raw sockets: a
connection trickling header lines, one that sends nothing, and one trickling its body are each
answered 408 and closed once ``http_read_timeout_s`` has passed; a head of huge or of very many
headers is refused (431 with an OpenAI-style body when it arrives whole, 400 when it grows past
what h11 buffers). Meanwhile a real client (``openai``) is served as usual: the slow ones stall
nobody. Afterwards the router serves and nothing leaked."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from urllib.parse import urlsplit

import openai
import pytest
from hardening_lib import start_router, stop_router, wait_nothing_leaked, wait_serves

from deploy.local_cluster import LocalCluster
from router.edge import MAX_HEAD_BYTES
from router.http_io import MAX_HEADER_BYTES, MAX_HEADERS

pytestmark = pytest.mark.timeout(120)
READ_TIMEOUT_S = 3.0
SLOW = {"loris": 30, "silent": 5, "slow-body": 5}  # connections of each kind
# Each slow connection is cut READ_TIMEOUT_S after its head began (or its body was due); its 408
# reaches us within 5 s more on a loaded 2-core machine (it is one timer callback in the router).
CUT_WITHIN_S = READ_TIMEOUT_S + 5.0


def _connect(address: tuple[str, int], kind: str) -> socket.socket:
    s = socket.create_connection(address, timeout=10)
    if kind == "loris":
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    elif kind == "slow-body":
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"model\": ")
    s.setblocking(False)
    return s


def _hold(address: tuple[str, int], cut: dict[str, list[tuple[float, bytes]]], opened: threading.Event) -> None:
    """Open the slow connections; trickle a header line (or body byte) into each every 0.25 s
    until the router answers or closes it; record when and with what status line."""
    conns = {s: kind for kind, n in SLOW.items() for s in (_connect(address, kind) for _ in range(n))}
    t0 = time.monotonic()
    opened.set()
    i = 0
    while conns and time.monotonic() - t0 < CUT_WITHIN_S + 5:
        readable, _, _ = select.select(list(conns), [], [], 0.25)
        for s in readable:
            try:
                data = s.recv(200)
            except OSError:
                data = b""
            cut[conns.pop(s)].append((time.monotonic() - t0, data.split(b"\r\n", 1)[0]))
            s.close()
        i += 1
        for s, kind in list(conns.items()):
            try:
                if kind == "loris":
                    s.send(b"X-Slow-%d: x\r\n" % i)
                elif kind == "slow-body":
                    s.send(b" ")
            except OSError:  # closed under us: read it on the next turn
                pass
    for s in conns:
        s.close()


def _raw(address: tuple[str, int], chunks: list[bytes]) -> tuple[int, bytes]:
    """Send a request in ``chunks`` (a short pause between them); the answer's status and body."""
    with socket.create_connection(address, timeout=10) as s:
        for chunk in chunks:
            try:
                s.sendall(chunk)
            except OSError:  # refused before the end
                break
            if len(chunks) > 1:
                time.sleep(0.02)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
            data = s.recv(65536)
            if not data:
                break
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_slow_and_flooding_clients_are_cut_and_stall_nobody(sim_cluster: LocalCluster) -> None:
    router = start_router(sim_cluster, http_read_timeout_s=READ_TIMEOUT_S)
    try:
        url = router.ready["http"]
        wait_serves(url)
        parts = urlsplit(url)
        address = (parts.hostname, parts.port)
        cut: dict[str, list[tuple[float, bytes]]] = {kind: [] for kind in SLOW}
        opened = threading.Event()
        holder = threading.Thread(target=_hold, args=(address, cut, opened))
        holder.start()
        assert opened.wait(10)
        # while the slow connections are held, a real client is served as usual
        t0 = time.monotonic()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)
        model = sim_cluster.router["model"]
        outs = [client.completions.create(model=model, prompt=f"{i} hello", max_tokens=4,
                                          extra_body={"ignore_eos": True}) for i in range(5)]
        served_s = time.monotonic() - t0
        still_held = not any(cut.values())
        # header floods: a whole head over the app's limits (431, an OpenAI body), and one trickled
        # past what h11 buffers of an unfinished head (400). Each stays under h11's buffer or stops
        # right past it, so the router has read every byte when it answers (no reset loses the answer).
        huge = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 8192) + b"\r\n\r\n"
        many = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(2000)) + b"\r\n"
        assert len(huge) < MAX_HEAD_BYTES and len(many) < MAX_HEAD_BYTES
        trickled = [b"GET /health HTTP/1.1\r\nHost: x\r\n"] + [b"X-Pad: " + b"a" * 4000 + b"\r\n"] * 9
        assert sum(map(len, trickled)) > MAX_HEAD_BYTES
        floods = {"huge": _raw(address, [huge]), "many": _raw(address, [many]), "trickled": _raw(address, trickled)}
        holder.join()
    finally:
        if router.proc.poll() is None:
            stop_router(router)
    print(f"slow clients: {sum(SLOW.values())} held; 5 completions served meanwhile in {served_s:.2f} s; cut at "
          + ", ".join(f"{k} {min(t for t, _ in v):.2f}-{max(t for t, _ in v):.2f} s" for k, v in cut.items() if v)
          + f"; floods: { {k: s for k, (s, _) in floods.items()} }")
    assert all(o.usage.completion_tokens == 4 for o in outs)
    assert still_held, "the slow connections were cut before the real client was served: it waited for them"
    for kind, n in SLOW.items():
        assert len(cut[kind]) == n, (kind, cut[kind])  # each was answered or closed
        for t, status_line in cut[kind]:
            assert status_line == b"HTTP/1.1 408 Request Timeout", (kind, status_line)
            assert READ_TIMEOUT_S - 0.5 <= t <= CUT_WITHIN_S, (kind, t)
    for name in ("huge", "many"):
        status, body = floods[name]
        assert status == 431, (name, status, body[:200])
        assert json.loads(body)["error"]["code"] == "request_header_fields_too_large"
        assert str(MAX_HEADERS) in json.loads(body)["error"]["message"]
    assert floods["trickled"][0] == 400, floods["trickled"]
    wait_serves(sim_cluster.http_url)
    wait_nothing_leaked(sim_cluster)
