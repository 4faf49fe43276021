"""A plain Python pass-through nbdkit plugin: the reference our plugin is measured against.

It does the least a Python plugin can do per request (one os.preadv/os.pwrite on the
file, zero copy into nbdkit's buffer), with the same thread model as ours.
  nbdkit -U SOCK python tools/passthrough_plugin.py file=PATH [threadmodel=serialize_all|parallel]
                                                    [keep-thread-state=on]

keep-thread-state=on does what our plugin does (plugin/pythread.py): it holds the connection
thread's Python thread state from open to close, so that nbdkit does not create and destroy
one per request. `make bench` runs the pass-through both ways, to show how much of our
lead over the plain one is that alone.
"""
import ctypes
import os
import threading

import nbdkit

API_VERSION = 2
_path, _fd, _model, _keep = None, -1, "serialize_all", False


def config(key, value):
    global _path, _model, _keep
    if key == "file":
        _path = os.path.abspath(value)
    elif key == "threadmodel":
        _model = value
    elif key == "keep-thread-state":
        _keep = value == "on"
    else:
        raise RuntimeError(f"unknown parameter {key}")


def config_complete():
    if not _path:
        raise RuntimeError("file= is required")


def thread_model():
    return {"serialize_all": nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS,
            "serialize_requests": nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS,
            "parallel": nbdkit.THREAD_MODEL_PARALLEL}[_model]


def open(readonly):
    global _fd
    if _fd < 0:
        assert _path is not None  # config_complete refused a missing path
        _fd = os.open(_path, os.O_RDWR)
    if _keep:
        ctypes.pythonapi.PyGILState_Ensure.restype = ctypes.c_int
        return (threading.get_ident(), ctypes.pythonapi.PyGILState_Ensure())
    return None


def close(h):
    if h is not None and h[0] == threading.get_ident():
        ctypes.pythonapi.PyGILState_Release(ctypes.c_int(h[1]))


def get_size(h):
    return os.fstat(_fd).st_size


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    os.preadv(_fd, [buf], offset)


def pwrite(h, buf, offset, flags):
    os.pwrite(_fd, buf, offset)


def flush(h, flags):
    os.fdatasync(_fd)
