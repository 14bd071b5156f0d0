"""SIGTERM and SIGINT that always reach a server's stop event.

``loop.add_signal_handler`` alone delivers a signal through the event loop's self-pipe (the wakeup
fd); under load that pipe can be full (every ``call_soon_threadsafe`` from a gRPC or engine thread
writes a byte to it), the C handler's write fails ("Exception ignored when trying to write to the
signal wakeup fd") and asyncio never hears of the signal: a router under 500 streams ignored its
SIGTERM. Here the loop's handler still wakes the loop, and a Python-level handler, which the
interpreter runs in the main thread whatever the pipe holds, sets the event too."""

from __future__ import annotations

import asyncio
import signal


def stop_on_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event,
                    signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """``stop`` is set on each of ``signals``, even when the loop's wakeup pipe is full."""
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)  # sets the wakeup fd: a signal wakes the loop
        signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
