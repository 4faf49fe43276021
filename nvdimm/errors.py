"""The model's refusal: an errno the kernel would give, and one line that says why."""
from btt_core.errors import ErrnoError


class NdError(ErrnoError):
    """A refused operation. str() starts with the errno's name, e.g. 'EBUSY: ...'."""
