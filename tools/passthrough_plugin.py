"""A plain Python pass-through nbdkit plugin: the reference our plugin is measured against.

It does the least a Python plugin can do per request (one os.preadv/os.pwrite on the
file, zero copy into nbdkit's buffer), with the same thread model as ours.
  nbdkit -U SOCK python tools/passthrough_plugin.py file=PATH [threadmodel=serialize_all|parallel]
"""
import os

import nbdkit

API_VERSION = 2
_path, _fd, _model = None, -1, "serialize_all"


def config(key, value):
    global _path, _model
    if key == "file":
        _path = os.path.abspath(value)
    elif key == "threadmodel":
        _model = value
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
        _fd = os.open(_path, os.O_RDWR)
    return 1


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
