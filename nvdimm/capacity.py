"""Capacity arithmetic of a labelled region: the free runs between namespace extents."""
from __future__ import annotations


def free_gaps(extents: list[tuple[int, int]], size: int, align: int) -> list[tuple[int, int]]:
    """(aligned start, length) of every free run of [0, size) outside the sorted (offset,
    length) `extents`, in offset order; a run starts at the next multiple of `align`."""
    gaps, cursor = [], 0
    for start, length in [*extents, (size, 0)]:
        aligned = -(-cursor // align) * align
        if start > aligned:
            gaps.append((aligned, start - aligned))
        cursor = max(cursor, start + length)
    return gaps
