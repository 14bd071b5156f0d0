"""A server's SIGTERM reaches its stop event even when the event loop's wakeup pipe is full (a
router under load: every ``call_soon_threadsafe`` writes a byte to it), in a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import asyncio, time
    from runtime.signals import stop_on_signals

    async def main():
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        stop_on_signals(loop, stop)  # loop.add_signal_handler alone: "SIGNAL LOST" (seen)
        loop._csock.setblocking(False)
        filled = 0
        try:
            while True:  # fill the self-pipe (the wakeup fd) as a loaded loop can find it
                filled += loop._csock.send(b"\\0" * 4096)
        except BlockingIOError:
            pass
        print("FULL", filled, flush=True)
        time.sleep(1.0)  # the loop blocked (it would drain the pipe): SIGTERM's byte finds it full
        try:
            await asyncio.wait_for(stop.wait(), 3)
            print("STOPPED", flush=True)
        except asyncio.TimeoutError:
            print("SIGNAL LOST", flush=True)

    asyncio.run(main())
""")


def test_sigterm_reaches_the_stop_event_with_the_wakeup_pipe_full() -> None:
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("FULL"), line + proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert "STOPPED" in out, out + err
