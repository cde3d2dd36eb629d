"""Never lose the record: a signal that lands inside gradwatch's own work waits until it is done.

SIGTERM is turned into ``SystemExit(128 + 15)`` and SIGINT into ``KeyboardInterrupt``, as usual —
except while a step's statistics are being queued or a window is being written, when the signal is
held and raised the moment that work ends. Without this, a signal between "window copied" and
"window written" loses the window or tears the file in the middle.

Handlers are installed only in the main thread, only over the default ones (a script's own handlers
are left alone), and restored when the last watch closes.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

_depth = 0
_pending: int | None = None
_saved: dict[int, Any] = {}
_users = 0


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def _handler(signum: int, frame: Any) -> None:
    global _pending
    if _depth:
        _pending = signum  # raised when the critical section ends
        return
    _raise_for(signum)


class _Critical:
    """``with critical:`` — a section no handled signal interrupts (re-entrant, cheap)."""

    def __enter__(self) -> None:
        global _depth
        _depth += 1

    def __exit__(self, *exc: Any) -> None:
        global _depth, _pending
        _depth -= 1
        if _depth == 0 and _pending is not None:
            signum, _pending = _pending, None
            _raise_for(signum)


critical = _Critical()


def acquire() -> None:
    """A watch starts: install the handlers if it is the first one."""
    global _users
    _users += 1
    if _users > 1 or threading.current_thread() is not threading.main_thread():
        return
    defaults = {signal.SIGTERM: (signal.SIG_DFL, None), signal.SIGINT: (signal.default_int_handler,)}
    for signum, default in defaults.items():
        current = signal.getsignal(signum)
        if current in default:
            _saved[signum] = current
            signal.signal(signum, _handler)


def release() -> None:
    """A watch ends: restore the handlers when it was the last one."""
    global _users
    _users = max(0, _users - 1)
    if _users or threading.current_thread() is not threading.main_thread():
        return
    for signum, previous in list(_saved.items()):
        if signal.getsignal(signum) is _handler:
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        del _saved[signum]
