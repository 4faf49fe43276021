"""The devices of a region: namespaces and BTT personalities, as plain state. The rules
that change them live in nvdimm/region.py."""
from __future__ import annotations

import uuid as uuidlib


class Namespace:
    """namespaceR.M: an extent of the region, raw-bound, claimed, or idle."""

    def __init__(self, name: str, dev_id: int, kind: str, *, offset: int = 0, size: int = 0,
                 uuid: uuidlib.UUID | None = None, alt_name: str = "", sector_size: int = 512,
                 claim_class: str = "none"):
        self.name, self.id, self.kind = name, dev_id, kind  # kind: "io" or "pmem"
        self.offset, self.size, self.uuid = offset, size, uuid
        self.alt_name, self.sector_size, self.claim_class = alt_name, sector_size, claim_class
        self.force_raw = False
        self.claim: BttDevice | None = None  # the one personality holding this namespace
        self.bound = False  # the raw driver is attached: the raw export exists

    @property
    def configured(self) -> bool:
        return self.size > 0 and (self.kind == "io" or self.uuid is not None)

    @property
    def state(self) -> str:
        """The §3.1 state name: seed, idle, raw, raw+claimed, claimed or btt-active."""
        if self.claim is not None:
            if self.claim.bound:
                return "btt-active"
            return "raw+claimed" if self.bound else "claimed"
        if self.bound:
            return "raw"
        return "idle" if self.configured else "seed"

    @property
    def active_mode(self) -> str | None:
        """What is exported: "raw", "sector", or None."""
        if self.claim is not None and self.claim.bound:
            return "sector"
        return "raw" if self.bound else None

    def identity(self) -> tuple:
        return (self.uuid, self.size, self.offset, self.sector_size, self.alt_name,
                self.claim_class)


class BttDevice:
    """bttR.M: a BTT personality; bound, it serves its namespace in sector mode."""

    def __init__(self, name: str, dev_id: int):
        self.name, self.id = name, dev_id
        self.uuid: uuidlib.UUID | None = None
        self.sector_size: int | None = None
        self.ndns: Namespace | None = None
        self.bound = False
        self.info: dict | None = None  # the info block found or written at bind
        self.claimed_identity: tuple | None = None  # the namespace's identity at claim time

    @property
    def state(self) -> str:
        """B0 seed-like "unconfigured", B1 "configured", B2 "attached", B3 "active"."""
        if self.bound:
            return "active"
        if self.ndns is not None:
            return "attached"
        return "configured" if self.uuid or self.sector_size else "unconfigured"
