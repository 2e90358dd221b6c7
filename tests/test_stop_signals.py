"""A `serve` process stops on SIGTERM whenever it arrives, even mid-way into its wait."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import time

from tests.peers import REPO

# Waits with a timeout of 0, over and over: the main thread spends most of its time
# entering and leaving the wait, where a handler that set a threading.Event
# deadlocked (8 of 30 such processes hung, with that handler in place of StopSignals).
_WAITER = textwrap.dedent(
    """
    import signal
    from pacs_node.stop_signals import StopSignals

    stop_signals = StopSignals([signal.SIGTERM])
    print("waiting", flush=True)
    while (received := stop_signals.wait(0)) is None:
        pass
    print(received.name, flush=True)
    """
)


def test_sigterm_stops_a_waiter_at_whatever_moment_it_arrives() -> None:
    for _ in range(20):
        waiter = subprocess.Popen(
            [sys.executable, "-c", _WAITER], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        assert waiter.stdout is not None
        assert waiter.stdout.readline() == "waiting\n"
        time.sleep(random.uniform(0.0, 0.05))  # a moment anywhere in the loop
        waiter.terminate()
        try:
            output, _ = waiter.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            waiter.kill()
            waiter.wait()
            raise AssertionError("SIGTERM did not end the wait") from None
        assert (output, waiter.returncode) == ("SIGTERM\n", 0)


def test_a_signal_sent_before_the_wait_is_kept_and_others_are_not_taken_for_it() -> None:
    script = textwrap.dedent(
        """
        import os, signal
        from pacs_node.stop_signals import StopSignals

        stop_signals = StopSignals([signal.SIGTERM, signal.SIGINT])
        signal.signal(signal.SIGUSR2, lambda signum, frame: None)
        assert stop_signals.wait(0.01) is None
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop_signals.wait(0.01) is None
        os.kill(os.getpid(), signal.SIGINT)
        print(stop_signals.wait(10).name)
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert (completed.stdout, completed.stderr, completed.returncode) == ("SIGINT\n", "", 0)
