"""The model's numbers, each defined once: sizes, sector sizes, claim classes."""
from btt_core import SECTOR_SIZES

KiB, MiB = 1 << 10, 1 << 20
PAGE = 4 * KiB
MIN_NAMESPACE_SIZE = PAGE  # ND_MIN_NAMESPACE_SIZE since it was lowered from 4 MiB
MIN_CLAIM_SIZE = 16 * MiB  # a BTT (any personality) needs this much
DEFAULT_ALIGN = 16 * MiB  # region align for regions of 16 MiB and more (v5.7+)
PMEM_SECTOR_SIZES = (512, 4096)
BTT_SECTOR_SIZES = SECTOR_SIZES  # what the engine formats (btt.h)
ALT_NAME_MAX = 63  # a 64-byte label field, NUL-terminated
CLAIM_CLASSES = ("none", "btt", "btt2", "pfn", "dax", "unknown")
HOLDER_CLASS_TEXT = {"none": "", "btt": "btt", "btt2": "btt", "pfn": "pfn", "dax": "dax",
                     "unknown": "<unknown>"}
# Where a BTT's info block is for each claim class, and which version lives there (§1.5).
BTT_VERSION_FOR_CLASS = {"none": "1.1", "btt": "1.1", "btt2": "2.0"}
BTT_INFO_OFFSET = {"1.1": 4096, "2.0": 0}
