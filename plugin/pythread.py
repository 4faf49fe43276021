"""Keeps a connection thread's Python thread state alive between nbdkit callbacks.

nbdkit's Python plugin wraps every callback in PyGILState_Ensure/PyGILState_Release. On a
thread that has no Python thread state of its own, Ensure creates one and Release destroys
it again, so in the serialized thread models (one thread per connection, no Python of its
own) *every request* built and tore down a thread state: an mmap and munmap of its frame
stack, a gettid, and a cold cache. perf and strace showed it as the largest single cost of
a request after the socket I/O, for any Python plugin (docs/benchmark-notes.md).

Holding one extra PyGILState reference from open() to close() of a connection makes the
callbacks in between find the thread state and reuse it. The reference must be given back
on the same thread, or that thread's state is never freed; so close() releases it only
there, and a connection closed elsewhere (never seen with nbdkit 1.32) keeps its few KiB.
Worker threads of the PARALLEL model are not pinned: nbdkit ends them without a callback
in which their reference could be given back.
"""
from __future__ import annotations

import ctypes
import threading

try:
    _ensure = ctypes.pythonapi.PyGILState_Ensure
    _release = ctypes.pythonapi.PyGILState_Release
    _ensure.restype = ctypes.c_int
    _ensure.argtypes = []
    _release.restype = None
    _release.argtypes = [ctypes.c_int]
except AttributeError:  # an interpreter without the C API symbols exported
    _ensure = _release = None

_lock = threading.Lock()
held = 0  # thread states currently kept alive (tests read it)


class ThreadStatePin:
    """One extra PyGILState reference held by the thread that made it."""

    __slots__ = ("thread_id", "state")

    def __init__(self, thread_id: int, state: int):
        self.thread_id, self.state = thread_id, state

    def release(self) -> bool:
        """Gives the reference back if called on the thread that took it; True if it did."""
        global held
        if self.state is None or threading.get_ident() != self.thread_id:
            return False
        state, self.state = self.state, None
        _release(state)
        with _lock:
            held -= 1
        return True


def keep_thread_state() -> ThreadStatePin | None:
    """Holds this thread's Python thread state until the pin is released (same thread)."""
    global held
    if _ensure is None:
        return None
    pin = ThreadStatePin(threading.get_ident(), _ensure())
    with _lock:
        held += 1
    return pin
