"""The one exception base for every refusal and failure that carries an errno.

The engine's failures (BttError), the model's refusals (nvdimm's NdError) and the label
area's (LabelError) all derive from it, so a caller that reports errors in one line --
the CLI, the control socket, the plugin's log -- handles exactly one type. `.message` is
the text without the errno's name; str() and .strerror start with it ('EBUSY: ...').
"""
from __future__ import annotations

import errno as _errno


def errno_name(err: int) -> str:
    return _errno.errorcode.get(err, str(err))


class ErrnoError(OSError):
    def __init__(self, err: int, message: str):
        prefix = f"{errno_name(err)}: "
        super().__init__(err, message if message.startswith(prefix) else prefix + message)
        self.message = message[len(prefix):] if message.startswith(prefix) else message

    def __str__(self) -> str:
        return self.strerror
