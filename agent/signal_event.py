"""An Event that a signal handler may set.

Python runs a signal handler in the main thread, between two of its bytecodes: possibly while that
thread is inside the same Event's `wait` or `set`, holding the Event's internal lock. That lock is
a plain Lock in threading.Event, so the handler's `set` would wait for it forever, and the agent
would hang until the watchdog killed it. Here the lock is reentrant: the handler's `set` goes
through, and the interrupted `wait` returns at its timeout at the latest.
"""

from __future__ import annotations

import threading


class SignalSafeEvent(threading.Event):
    def __init__(self) -> None:
        super().__init__()
        self._cond = threading.Condition(threading.RLock())
