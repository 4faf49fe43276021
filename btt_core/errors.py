"""The one exception base for every refusal and failure that carries an errno.

The engine's failures (BttError), the model's refusals (nvdimm's NdError) and the label
area's (LabelError) all derive from it, so a caller that reports errors in one line --
the CLI, the control socket, the plugin's log -- handles exactly one type. `.strerror`
(and `.message`) is the text alone, for composing a longer message; str() starts with the
errno's name ('EBUSY: ...'), which is how a refusal reads to a user.
"""
from __future__ import annotations

import errno as _errno


def errno_name(err: int | None) -> str:
    """'EBUSY' for errno.EBUSY; the number itself for one Python does not know."""
    return _errno.errorcode.get(err or 0, str(err))


def one_line(e: OSError) -> str:
    """Any OSError as one line that starts with its errno's name: 'EBUSY: text'."""
    name, text = errno_name(e.errno), e.strerror or str(e)
    return text if text.startswith(f"{name}:") else f"{name}: {text}"


class ErrnoError(OSError):
    def __init__(self, err: int | None, message: str):
        # An OSError may carry no errno; passed on, that becomes EIO, never "no error".
        super().__init__(err or _errno.EIO, message)
        self.message = message

    def __str__(self) -> str:
        return f"{errno_name(self.errno or 0)}: {self.message}"
