"""A signal handler that sets an Event while the main thread holds that Event's lock."""

import subprocess
import sys

import pytest

# The main thread inside the Event's lock (as in wait() or set()) when the signal comes: the
# handler runs there, at the next bytecode, and sets the same Event.
SCENARIO = """
import os, signal, sys, threading
from agent.signal_event import SignalSafeEvent
event = SignalSafeEvent() if sys.argv[1] == "signal-safe" else threading.Event()
signal.signal(signal.SIGUSR1, lambda signum, frame: event.set())
with event._cond:
    os.kill(os.getpid(), signal.SIGUSR1)
    handled = True
print("set" if event.wait(1) else "not set")
"""


def run(kind: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCENARIO, kind], capture_output=True, text=True, timeout=timeout)


def test_a_handler_sets_the_event_the_interrupted_main_thread_holds():
    done = run("signal-safe", timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "set"


def test_the_same_scenario_deadlocks_a_plain_threading_event():
    # What the agent's stop and reload events were: the scenario above is one that matters.
    with pytest.raises(subprocess.TimeoutExpired):
        run("plain", timeout=3)
