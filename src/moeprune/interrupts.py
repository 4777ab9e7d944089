"""SIGINT and SIGTERM as exceptions, so that an interrupted run removes what it half-wrote.

`raise_on_signals` makes both signals raise `errors.Interrupted` in the main thread for the duration
of a block (the CLI wraps a whole command in it; `atomic_directory` wraps a save in it when nothing
else did). `deferred_signals` holds a signal that arrives inside a short block (the two renames that
swap an output into place) and raises it when the block ends, so that the block is never split.
Outside the main thread both are no-ops (Python runs signal handlers in the main thread only).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {"installed": False, "deferring": 0, "pending": []}


def _handler(signum: int, frame) -> None:
    if _state["deferring"]:
        _state["pending"].append(signum)
        return
    raise Interrupted(signum)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def raise_on_signals(*, redeliver: bool = False) -> Iterator[None]:
    """SIGINT/SIGTERM raise `Interrupted` inside the block (nested: the outer block's handlers stay).
    Handlers someone else installed are left alone. With `redeliver`, an `Interrupted` that leaves the
    block is turned back into its signal under the previous handler (a library caller that did not
    ask for exceptions is terminated by SIGTERM as before, after the cleanup)."""
    if _state["installed"] or not _main_thread():
        yield
        return
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    ours = [s for s in SIGNALS if previous[s] in (defaults[s], signal.SIG_DFL)]
    for s in ours:
        signal.signal(s, _handler)
    _state["installed"] = True
    try:
        yield
    except Interrupted as e:
        if not redeliver or e.signum not in ours:
            raise
        signal.signal(e.signum, previous[e.signum])
        if e.signum == signal.SIGINT:
            raise KeyboardInterrupt from None
        os.kill(os.getpid(), e.signum)
        raise
    finally:
        for s in ours:
            if signal.getsignal(s) is _handler:
                signal.signal(s, previous[s])
        _state["installed"] = False


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM (when `raise_on_signals` handles them) until the block ends, then raise."""
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1
    if not _state["deferring"] and _state["pending"]:
        signum = _state["pending"][0]
        _state["pending"].clear()
        raise Interrupted(signum)
