"""The exit statuses every bttctl verb shares, from sysexits(3) as Python's os module names
them; a verb's own statuses (check-namespace's 0-3, say) are defined beside the verb."""
import os

EXIT_REFUSED = 1  # the request was understood and refused: the errno line says why
EXIT_USAGE = os.EX_USAGE  # 64: bad arguments, or no server to talk to
EXIT_DATAERR = os.EX_DATAERR  # 65: the input file is not what it must be
EXIT_IO = os.EX_IOERR  # 74: reading or writing failed
