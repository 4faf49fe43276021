"""Keeps the Python thread states of the threads that serve a connection alive between
nbdkit callbacks.

nbdkit's Python plugin wraps every callback in PyGILState_Ensure/PyGILState_Release. On a
thread that has no Python thread state of its own, Ensure creates one and Release destroys
it again, so *every request* built and tore down a thread state: an mmap and munmap of its
frame stack, a gettid, and a cold cache. perf and strace showed it as the largest single
cost of a request after the socket I/O, for any Python plugin (docs/benchmark-notes.md).

Holding one extra PyGILState reference makes the callbacks that follow find the thread
state and reuse it. Two kinds of thread serve a connection:

* the connection thread itself (serialized thread models: it runs every callback). open()
  pins it and close() gives the reference back; both run on that thread.
* the worker threads of the PARALLEL model (nbdkit's --threads per connection). A worker
  is pinned by its first data request (ConnectionThreads.pinned wraps the data callbacks).
  nbdkit ends the workers without a callback on their own threads, before it calls close()
  on the connection thread; close() then clears and deletes their states. A state is
  deleted only once its thread is gone from /proc, so no running thread ever loses the
  state it is using; one still listed (pthread_join returns a moment before the kernel
  forgets the thread) is deleted by a later close().
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
from typing import Any

_ensure: Any  # PyGILState_Ensure, or None where the C API is not exported
try:
    _api = ctypes.pythonapi
    _ensure, _release = _api.PyGILState_Ensure, _api.PyGILState_Release
    _this_state = _api.PyGILState_GetThisThreadState
    _clear, _delete = _api.PyThreadState_Clear, _api.PyThreadState_Delete
    _ensure.restype, _ensure.argtypes = ctypes.c_int, []
    _release.restype, _release.argtypes = None, [ctypes.c_int]
    _this_state.restype, _this_state.argtypes = ctypes.c_void_p, []
    _clear.restype, _clear.argtypes = None, [ctypes.c_void_p]
    _delete.restype, _delete.argtypes = None, [ctypes.c_void_p]
except AttributeError:  # an interpreter without the C API symbols exported
    _ensure = None

# The thread model the server uses unless told otherwise: one thread per connection, every
# connection at once. `parallel` would also overlap the requests of one connection, but
# nbdkit 1.32 aborts the whole server when a client drops its connection with replies in
# flight (docs/serving.md). DEFAULT_WORKERS: the worker threads per connection that
# `bttctl serve --threadmodel parallel` gives nbdkit, the best measured on 2 cores.
DEFAULT_THREAD_MODEL = "serialize_requests"
DEFAULT_WORKERS = 4

_lock = threading.Lock()
held = 0  # thread states currently kept alive (tests read it)
_orphans: list[tuple[int, int]] = []  # (tid, PyThreadState*) of ended workers, to delete


def _count(delta: int) -> None:
    global held
    with _lock:
        held += delta


class ThreadStatePin:
    """One extra PyGILState reference held by the thread that made it."""

    __slots__ = ("thread_id", "state")

    def __init__(self, thread_id: int, state: int):
        self.thread_id = thread_id
        self.state: int | None = state  # None once released

    def release(self) -> bool:
        """Gives the reference back if called on the thread that took it; True if it did."""
        if self.state is None or threading.get_ident() != self.thread_id:
            return False
        state, self.state = self.state, None
        _release(state)
        _count(-1)
        return True


def keep_thread_state() -> ThreadStatePin | None:
    """Holds this thread's Python thread state until the pin is released (same thread)."""
    if _ensure is None:
        return None
    pin = ThreadStatePin(threading.get_ident(), _ensure())
    _count(1)
    return pin


# Deleting a worker's state from another thread is safe in 3.11: PyThreadState_Delete
# unbinds the calling thread's PyGILState slot only if it holds that very state. 3.12
# clears the caller's slot unconditionally, which would leave the connection thread without
# its own state and make the next PyGILState_Release abort the process; there the worker
# states are left allocated (a few KiB per worker per connection) rather than deleted.
_CAN_DELETE_OTHER_STATES = sys.version_info < (3, 12)


class ConnectionThreads:
    """The worker threads of one connection whose thread states are pinned."""

    __slots__ = ("states",)

    def __init__(self):
        # ident -> (native tid, PyThreadState*). Made by open(), on the connection thread,
        # which is pinned already (keep_thread_state): with nbdkit --threads 1 it runs the
        # requests itself, and a second pin there would never be given back.
        self.states: dict[int, tuple[int, int] | None] = {threading.get_ident(): None}

    def pinned(self, call):
        """call, pinning the calling thread's state first if it is not pinned yet."""
        states, get_ident = self.states, threading.get_ident

        def pinned_call(*args):
            if get_ident() not in states:
                self._pin_this_thread()
            return call(*args)
        return pinned_call

    def _pin_this_thread(self) -> None:
        if _ensure is None:
            return
        _ensure()  # never released: close() deletes the state once the thread has ended
        with _lock:  # workers of one connection pin themselves concurrently
            self.states[threading.get_ident()] = (threading.get_native_id(), _this_state())
        _count(1)

    def release(self) -> int:
        """Deletes the states of workers that have ended (call from close(), GIL held).
        A worker joined a moment ago may still show in /proc: its state waits in a list
        that every later close() tries again, so none is lost for good. Returns how many
        states wait, this connection's and earlier ones'."""
        global held
        with _lock:
            waiting = _orphans + [p for p in self.states.values() if p is not None]
            self.states = {}
            left = []
            for tid, state in waiting:
                # nbdkit joins the workers before close(); /proc is a second opinion
                if not _CAN_DELETE_OTHER_STATES or os.path.exists(f"/proc/self/task/{tid}"):
                    left.append((tid, state))
                    continue
                _clear(state)
                _delete(state)
                held -= 1
            _orphans[:] = left
        return len(left)
