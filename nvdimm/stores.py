"""Stores: where a region's label-backed facts (uuid, name, extent, lbasize, claim class)
persist. `AreaStore` keeps them in a region file's label area; `NoLabels` stands for a
label-less file, which has one io namespace and nothing to persist."""
from __future__ import annotations

import errno

from nvdimm.errors import NdError
from nvdimm.labels import NamespaceLabel


class AreaStore:
    """Labels in a region file's Linux/UEFI label area (nvdimm.labels)."""

    labelled = True

    def __init__(self, area):
        self.area = area
        self.size = area.pmem_size
        self.version = area.version

    def load(self) -> list[NamespaceLabel]:
        return self.area.namespaces()

    def reserved_extents(self) -> list[tuple[int, int]]:
        return self.area.reserved_extents()

    def save(self, labels: list[NamespaceLabel]) -> None:
        self.area.update(labels)


class NoLabels:
    """A label-less region: one io namespace covering `size` bytes, nothing to persist."""

    labelled = False
    version = None

    def __init__(self, size: int):
        self.size = size

    def load(self) -> list[NamespaceLabel]:
        return []

    def reserved_extents(self) -> list[tuple[int, int]]:
        return []

    def save(self, labels) -> None:
        raise NdError(errno.ENXIO, "a label-less region has no labels to update")


def persisted_claim_class(claim_class: str, label_version: str | None) -> str:
    """What a label of this version can record: v1.1 labels have no claim-class field."""
    return claim_class if label_version == "1.2" else "none"
