"""The model's invariants (namespace-model.md §3.3), checked after every step of the
state-machine tests and available to anyone who suspects the model."""
from __future__ import annotations

from nvdimm.constants import BTT_VERSION_FOR_CLASS, CLAIM_CLASSES, MIN_CLAIM_SIZE


def check_invariants(region) -> None:
    """Raises AssertionError naming the first broken invariant."""
    def require(cond, message):
        if not cond:
            raise AssertionError(f"{region.name}: {message}")

    if not region.enabled:
        require(not region.namespaces and not region.btts and region.namespace_seed is None
                and region.btt_seed is None, "a disabled region has children")
        return
    for name, ns in region.namespaces.items():
        require(ns.name == name, f"{name} is registered under another name")
        holders = [b for b in region.btts.values() if b.ndns is ns]
        require(len(holders) == (ns.claim is not None), f"{name}: claim "
                f"{ns.claim and ns.claim.name} but held by {[b.name for b in holders]}")
        require(ns.claim is None or ns.claim is holders[0], f"{name}: claim and holder "
                "disagree")
        require(not (ns.bound and ns.claim and ns.claim.bound),
                f"{name} is raw-bound while {ns.claim and ns.claim.name} serves it")
        require(ns.kind == ("pmem" if region.labelled else "io"), f"{name}: a {ns.kind} "
                "namespace in this region")
        require(ns.claim_class in CLAIM_CLASSES, f"{name}: claim class {ns.claim_class}")
        if ns.claim is not None:
            require(ns.claim_class in BTT_VERSION_FOR_CLASS, f"{name}: a BTT claims a "
                    f"{ns.claim_class} namespace")
            require(ns.size >= MIN_CLAIM_SIZE, f"{name}: claimed below 16 MiB")
            require(ns.identity() == ns.claim.claimed_identity,
                    f"{name}: identity changed while claimed")
        if ns.bound or (ns.claim and ns.claim.bound):
            require(ns.configured, f"{name} is enabled without capacity or uuid")
    for name, btt in region.btts.items():
        require(btt.ndns is None or (btt.ndns.claim is btt and
                                     region.namespaces.get(btt.ndns.name) is btt.ndns),
                f"{name}: namespace pointer without a matching claim")
        if btt.bound:
            require(btt.ndns is not None and btt.uuid and btt.sector_size and btt.info,
                    f"{name} is enabled without a namespace, uuid or sector size")
        require(btt.ndns is not None or btt.bound is False, f"{name} bound without ns")
    seed = region.btt_seed
    require(seed is not None and region.btts.get(seed.name) is seed and not seed.bound,
            "the btt seed is missing or enabled")
    if region.labelled:
        seed = region.namespace_seed
        require(seed is not None and region.namespaces.get(seed.name) is seed and
                not seed.bound and not (seed.claim and seed.claim.bound),
                "the namespace seed is missing or enabled")
    else:
        require(region.namespace_seed is None and len(region.namespaces) == 1,
                "a label-less region has exactly one io namespace and no seed")
    uuids = [ns.uuid for ns in region.namespaces.values() if ns.uuid is not None]
    require(len(uuids) == len(set(uuids)), "duplicate namespace uuids")
    extents = region._extents()
    for (a_start, a_len), (b_start, _) in zip(extents, extents[1:], strict=False):
        require(a_start + a_len <= b_start, "namespace extents overlap")
    require(all(0 <= s and s + n <= region.size for s, n in extents),
            "an extent lies outside the region")
    require(0 <= region.available_size <= region.size, "available_size out of range")
    if region.labelled:
        stored = sorted((label.key() for label in region.store.load()), key=str)
        expected = sorted((label.key() for label in region._labels()), key=str)
        require(stored == expected, "the labels do not describe the namespaces")
