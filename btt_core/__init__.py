"""BTT engine: the Linux kernel's Block Translation Table on ordinary files."""
from .checker import check_io, check_namespace, read_infoblock
from .engine import (
                     DURABILITY,
                     SECTOR_SIZES,
                     Btt,
                     BttError,
                     Io,
                     boot_id,
                     compute_layout,
                     pack_info,
                     probe,
                     unpack_info,
)

__all__ = ["Btt", "BttError", "Io", "probe", "compute_layout", "pack_info", "unpack_info",
           "boot_id", "DURABILITY", "SECTOR_SIZES", "check_namespace", "check_io", "read_infoblock"]
