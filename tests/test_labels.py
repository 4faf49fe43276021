"""The label storage area: byte layout against label-format.md, detection, updates, crashes,
and damage (which must give a LabelError or a valid state, never a crash)."""
import errno
import struct
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from btt_core.engine import fletcher64
from nvdimm.labels import (
    CLAIM_CLASS_GUIDS,
    PMEM_TYPE_GUID,
    LabelArea,
    LabelError,
    NamespaceLabel,
    area_geometry,
    current_index,
    pack_index,
    pack_label,
    qemu_cookies,
    unpack_index,
)

from fakes import MemoryMedium

KiB, MiB = 1 << 10, 1 << 20
AREA = 128 * KiB
PMEM = 64 * MiB
U1 = uuid.UUID("11111111-2222-3333-4444-555555555555")


class TailMedium(MemoryMedium):
    """A region image that stores only its label area: `data` holds the last bytes of a
    `pmem + len(data)`-byte file, and `writes` offsets are relative to the area."""

    def __init__(self, tail, pmem=PMEM):
        super().__init__(tail)
        self.pmem = pmem

    def copy(self, data=None):
        return TailMedium(self.data if data is None else data, self.pmem)

    @property
    def size(self):
        return self.pmem + len(self.data)

    def read(self, offset, length):
        return super().read(offset - self.pmem, length)

    def write(self, offset, data):
        super().write(offset - self.pmem, data)


def image(version="1.2", area=AREA, pmem=PMEM):
    medium = TailMedium(bytes(area), pmem)
    LabelArea.format_medium(medium, area, version)
    medium.writes.clear()
    return medium


def ns(n, offset=None, size=16 * MiB, **kw):
    kw.setdefault("name", f"ns{n}")
    return NamespaceLabel(uuid=uuid.UUID(int=n + 1),
                          offset=n * 16 * MiB if offset is None else offset, size=size, **kw)


def keys(area):
    return [label.key() for label in area.namespaces()]


# ---- the format, byte for byte ---------------------------------------------------------------

@pytest.mark.parametrize("area,label_size,index_size,nslot", [
    (131072, 128, 256, 1020), (131072, 256, 256, 510),
    (262144, 128, 512, 2040), (262144, 256, 256, 1022)])
def test_geometry_matches_the_worked_values(area, label_size, index_size, nslot):
    assert area_geometry(area, label_size) == (index_size, nslot)


def test_fletcher64_by_hand():
    words = [1, 2, 0xFFFFFFFF]
    lo = hi = 0
    for w in words:
        lo = (lo + w) % 2**32
        hi = (hi + lo) % 2**32
    assert fletcher64(struct.pack("<3I", *words)) == hi << 32 | lo
    with pytest.raises(ValueError):
        fletcher64(b"abc")


DOC_INDEX_HEAD = bytes.fromhex("""
4e 41 4d 45 53 50 41 43 45 5f 49 4e 44 45 58 00  00 00 00 01  02 00 00 00
00 00 00 00 00 00 00 00  00 01 00 00 00 00 00 00  00 01 00 00 00 00 00 00
00 02 00 00 00 00 00 00  fe 01 00 00  01 00  02 00  19 3c 32 d8 56 e3 93 27
""")  # label-format.md §1.4, verbatim


def test_index_block_matches_the_linux_test_vector():
    """label-format.md §1.4: block 0 of a 128 KiB v1.2 area, seq 2, slot 1 in use, bitmap
    all ones up to bit 511 (ndctl's style) except bit 1."""
    assert len(DOC_INDEX_HEAD) == 72
    free = [True] * 510
    free[1] = False
    ours = pack_index(0, 256, "1.2", 2, 510, free)
    assert len(ours) == 256
    assert ours[:0x40] == DOC_INDEX_HEAD[:0x40]  # every header field
    # ndctl's variant has bits 510 and 511 set; its checksum is the one Linux wrote.
    ndctl = bytearray(ours)
    ndctl[72 + 63] |= 0xC0
    struct.pack_into("<Q", ndctl, 0x40, 0)
    assert fletcher64(bytes(ndctl)) == 0x2793E356D8323C19
    struct.pack_into("<Q", ndctl, 0x40, 0x2793E356D8323C19)
    assert bytes(ndctl[:72]) == DOC_INDEX_HEAD
    # ...and we read it, ignoring the bits past nslot.
    block, why = unpack_index(bytes(ndctl), 0, AREA, 256, 256)
    assert why == "" and block.seq == 2 and block.nslot == 510 and block.free == free
    # Ours zeroes those bits, as the kernel does.
    assert ours[72 + 63] & 0xC0 == 0


def reference_label(slot, cookie, abstraction):
    """The label of §2.1 packed field by field from the table's offsets."""
    raw = bytearray(256)
    raw[0x00:0x10] = U1.bytes
    raw[0x10:0x16] = b"myname"
    struct.pack_into("<I", raw, 0x50, 0)             # flags
    struct.pack_into("<H", raw, 0x54, 1)             # nlabel
    struct.pack_into("<H", raw, 0x56, 0)             # position
    struct.pack_into("<Q", raw, 0x58, cookie)        # isetcookie
    struct.pack_into("<Q", raw, 0x60, 4096)          # lbasize
    struct.pack_into("<Q", raw, 0x68, 0)             # dpa
    struct.pack_into("<Q", raw, 0x70, 0x10000000)    # rawsize
    struct.pack_into("<I", raw, 0x78, slot)          # slot
    raw[0x80:0x90] = bytes.fromhex("79d3f066f3b47440ac430d3318b78cdb")  # PMEM type GUID
    raw[0x90:0xA0] = abstraction
    return raw


def test_v12_label_matches_the_linux_test_vector():
    label = NamespaceLabel(uuid=U1, name="myname", offset=0, size=0x10000000, lbasize=4096,
                           claim_class="btt2")
    ours = pack_label(label, 1, "1.2", 0x00BA90120012B4DC)
    ref = reference_label(1, 0x00BA90120012B4DC,
                          bytes.fromhex("fc3b6318351717428ac917239282d3f8"))
    assert ours[:0xF8] == bytes(ref[:0xF8])
    assert struct.unpack_from("<Q", ours, 0xF8)[0] == 0x1BDDDC238D902313


def test_v11_label_is_the_first_128_bytes_without_guids():
    label = NamespaceLabel(uuid=U1, name="myname", offset=0, size=0x10000000, lbasize=4096)
    ours = pack_label(label, 1, "1.1", 0x002468AC00123456)
    ref = reference_label(1, 0x002468AC00123456, bytes(16))
    assert ours == bytes(ref[:0x7C]) + bytes(4)


def test_guid_byte_images():
    assert PMEM_TYPE_GUID == bytes.fromhex("79d3f066f3b47440ac430d3318b78cdb")
    assert CLAIM_CLASS_GUIDS["btt2"] == bytes.fromhex("fc3b6318351717428ac917239282d3f8")
    assert CLAIM_CLASS_GUIDS["btt"] == bytes.fromhex("a263ed8aa229664c8b12f05d15d3922a")
    assert CLAIM_CLASS_GUIDS["none"] == bytes(16)


def test_qemu_cookies():
    assert qemu_cookies(0) == (0x002468AC00123456, 0x00BA90120012B4DC)
    assert qemu_cookies(1)[1] == 0x00BA901C0012B4DD


@pytest.mark.parametrize("seq0,seq1,current", [
    (3, 1, 1), (2, 1, 0), (1, 1, 1), (1, 2, 1), (3, 2, 0), (2, 3, 1), (None, 2, 1),
    (2, None, 0), (7, 1, 1)])  # 7 & 3 == 3: only the low bits count
def test_current_index_rule(seq0, seq1, current):
    assert current_index(seq0, seq1) == current


# ---- files: create, detect, round trips -------------------------------------------------------

@pytest.mark.parametrize("version,area_size", [("1.2", AREA), ("1.1", AREA), ("1.2", 256 * KiB),
                                               ("1.1", 256 * KiB)])
def test_create_detect_round_trip(tmp_path, version, area_size):
    path = tmp_path / "region.img"
    area = LabelArea.create(path, 256 * MiB, label_size=area_size, version=version)
    assert path.stat().st_size == 256 * MiB + area_size
    assert area.pmem_size == 256 * MiB and area.namespaces() == []
    cls = "btt2" if version == "1.2" else "none"
    wanted = [ns(0, lbasize=4096, claim_class=cls), ns(1, size=32 * MiB, name="é" * 31),
              ns(5, size=4096)]
    area.update(wanted)
    area.close()
    again = LabelArea.detect(path)
    assert again.version == version and again.area_size == area_size
    assert keys(again) == [label.key() for label in wanted]
    # the raw bytes are where QEMU keeps them: index 0 at S - L
    with open(path, "rb") as f:
        f.seek(256 * MiB)
        assert f.read(16) == b"NAMESPACE_INDEX\0"
    again.close()
    with pytest.raises(FileExistsError):
        LabelArea.create(path, 256 * MiB)


def test_detect_label_less_and_damaged(tmp_path):
    plain = tmp_path / "plain.img"
    plain.write_bytes(bytes(1 * MiB))
    assert LabelArea.detect(plain) is None
    path = tmp_path / "region.img"
    LabelArea.create(path, 16 * MiB).close()
    with open(path, "r+b") as f:  # break both index checksums; keep the signature
        for off in (16 * MiB + 0x40, 16 * MiB + 256 + 0x40):
            f.seek(off)
            f.write(b"\xff" * 8)
    with pytest.raises(LabelError) as e:
        LabelArea.detect(path)
    assert e.value.errno == errno.EUCLEAN and "bad checksum" in str(e.value)


def test_create_validates():
    with pytest.raises(LabelError) as e:
        LabelArea.create("/nonexistent/x", 1000)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(LabelError):
        LabelArea.create("/nonexistent/x", 4096, label_size=64 * KiB)


def test_update_follows_the_linux_protocol():
    medium = image()
    area = LabelArea(medium, AREA)
    assert (area.current, area.seq) == (0, 3)  # init-labels' 3/2 pair
    area.update([ns(0)])
    # one label in the lowest free slot, then index block 1 with seq 1 (successor of 3)
    base = 0  # offsets relative to the label area, which starts at S - L
    assert [off for off, _ in medium.writes] == [base + 512, base + 256]
    assert (area.current, area.seq) == (1, 1)
    area.update([ns(0, name="renamed")])
    # the new label takes slot 1 (slot 0 is live in the current index), block 0 gets seq 2
    assert [off for off, _ in medium.writes[2:]] == [base + 512 + 256, base]
    assert (area.current, area.seq) == (0, 2)
    assert [label.slot for label in area.namespaces()] == [1]
    assert area.index.free[0] and not area.index.free[1]
    writes = len(medium.writes)
    area.update([ns(0, name="renamed")])  # no change, no writes
    assert len(medium.writes) == writes
    area.update([])
    assert area.namespaces() == [] and all(area.index.free)


def test_update_validation():
    area = LabelArea(image(), AREA)
    bad = [
        ([ns(0), ns(0, offset=32 * MiB)], errno.EINVAL),             # same uuid twice
        ([ns(0), ns(1, offset=8 * MiB)], errno.EINVAL),              # overlap
        ([ns(0, name="x" * 64)], errno.EINVAL),                      # name too long
        ([ns(0, lbasize=520)], errno.EINVAL),
        ([ns(0, offset=100)], errno.EINVAL),                         # not page aligned
        ([ns(0, size=0)], errno.EINVAL),
        ([ns(3, size=32 * MiB)], errno.ENOSPC),                      # past the pmem area
        ([ns(0, claim_class="bogus")], errno.EINVAL),
        ([NamespaceLabel(uuid=uuid.UUID(int=0), size=4096)], errno.EINVAL),
    ]
    for wanted, err in bad:
        with pytest.raises(LabelError) as e:
            area.update(wanted)
        assert e.value.errno == err, wanted
    assert area.namespaces() == []
    v11 = LabelArea(image("1.1"), AREA)
    with pytest.raises(LabelError) as e:
        v11.update([ns(0, claim_class="btt2")])
    assert e.value.errno == errno.EINVAL and "v1.1" in str(e.value)


def test_running_out_of_slots():
    area = LabelArea(image(pmem=4 * MiB), AREA)
    many = [ns(i, offset=i * 4096, size=4096) for i in range(510)]
    area.update(many)
    assert len(area.namespaces()) == 510
    with pytest.raises(LabelError) as e:
        area.update(many[:-1] + [ns(600, offset=509 * 4096, size=4096)])
    assert e.value.errno == errno.ENOSPC
    assert len(area.namespaces()) == 510


# ---- what Linux would skip or refuse --------------------------------------------------------

def write_raw_label(medium, slot, raw, in_use=True):
    """Puts raw label bytes into a slot and commits an index saying it is in use."""
    area = LabelArea(medium, AREA)
    medium.write(PMEM + 512 + slot * 256, raw)
    free = list(area.index.free)
    free[slot] = not in_use
    nxt = 1 - area.current
    medium.write(PMEM + nxt * 256, pack_index(nxt, 256, "1.2", {1: 2, 2: 3, 3: 1}[area.seq],
                                              510, free))


def raw_label(slot=0, changes=None):
    label = NamespaceLabel(uuid=U1, name="x", offset=0, size=16 * MiB)
    raw = bytearray(pack_label(label, slot, "1.2", qemu_cookies(0)[1]))
    for off, (fmt, value) in (changes or {}).items():
        struct.pack_into(fmt, raw, off, value)
    struct.pack_into("<Q", raw, 0xF8, 0)
    struct.pack_into("<Q", raw, 0xF8, fletcher64(bytes(raw)))
    return bytes(raw)


@pytest.mark.parametrize("changes,expect", [
    ({}, "ok"),
    ({0x78: ("<I", 7)}, "skipped"),                          # slot field disagrees
    ({0x58: ("<Q", 0xDEADBEEF)}, "foreign"),                 # another DIMM slot's cookie
    ({0x58: ("<Q", qemu_cookies(0)[0])}, "ok"),              # cookie1 = altcookie
    ({0x70: ("<Q", 1 << 40)}, "skipped"),                    # extent past the pmem area
    ({0x50: ("<I", 8)}, "ok"),                               # UPDATING is accepted
    ({0x54: ("<H", 2)}, errno.EUCLEAN),                      # nlabel 2
    ({0x56: ("<H", 1)}, errno.EUCLEAN),                      # position 1
    ({0x80: ("<Q", 1)}, errno.EUCLEAN),                      # not a pmem type GUID
    ({0x90: ("<Q", 1)}, "unknown"),                          # unknown claim class, kept
])
def test_label_acceptance(changes, expect):
    medium = image()
    write_raw_label(medium, 0, raw_label(0, changes))
    if isinstance(expect, int):
        with pytest.raises(LabelError) as e:
            LabelArea(medium, AREA)
        assert e.value.errno == expect
        return
    area = LabelArea(medium, AREA)
    if expect == "ok":
        assert [label.uuid for label in area.namespaces()] == [U1]
    elif expect == "unknown":
        [label] = area.namespaces()
        assert label.claim_class == "unknown"
        area.update([label, ns(2)])  # rewriting others keeps the unknown GUID as it was
        assert area.namespaces()[0].key() == label.key()
    else:
        assert area.namespaces() == [] and len(area.skipped) == 1
        if expect == "foreign":  # its capacity stays reserved, and updates keep it
            assert area.reserved_extents() == [(0, 16 * MiB)]
            with pytest.raises(LabelError):
                area.update([ns(0)])
            area.update([ns(1)])
            assert area.reserved_extents() == [(0, 16 * MiB)]


def test_bad_label_checksum_is_skipped():
    raw = bytearray(raw_label())
    raw[0x20] ^= 1
    medium = image()
    write_raw_label(medium, 0, bytes(raw))
    area = LabelArea(medium, AREA)
    assert area.namespaces() == [] and "bad checksum" in area.skipped[0]


def test_duplicate_and_overlapping_labels_are_refused():
    medium = image()
    write_raw_label(medium, 0, raw_label(0))
    write_raw_label(medium, 1, raw_label(1, {0x68: ("<Q", 16 * MiB)}))
    with pytest.raises(LabelError) as e:
        LabelArea(medium, AREA)
    assert e.value.errno == errno.EUCLEAN and "both hold" in str(e.value)
    medium = image()
    write_raw_label(medium, 0, raw_label(0))
    write_raw_label(medium, 1, raw_label(1, {0x00: ("<Q", 5), 0x68: ("<Q", 8 * MiB)}))
    with pytest.raises(LabelError) as e:
        LabelArea(medium, AREA)
    assert "overlap" in str(e.value)


def test_a_flipped_bit_in_the_current_index_falls_back_to_the_other():
    medium = image()
    area = LabelArea(medium, AREA)
    area.update([ns(0)])         # block 1 current, seq 1
    area.update([ns(0), ns(1)])  # block 0 current, seq 2
    for bit in range(0, 256 * 8, 7):
        damaged = medium.copy()
        damaged.data[bit // 8] ^= 1 << bit % 8
        try:
            back = LabelArea(damaged, AREA)
        except LabelError as e:
            pytest.fail(f"bit {bit}: {e}")
        assert back.current == 1 and keys(back) == [ns(0).key()], bit


# ---- crash safety ----------------------------------------------------------------------------

def torn_variants(old: bytes, new: bytes, grain: int):
    """Every prefix-torn mix of old and new at `grain`-byte boundaries, the full old
    excluded and the full new included."""
    for cut in range(grain, len(new) + grain, grain):
        yield new[:cut] + old[cut:]


UPDATES = [
    [ns(0)],
    [ns(0), ns(1, lbasize=4096, claim_class="btt2")],
    [ns(1, lbasize=4096, claim_class="btt2", name="renamed")],
    [ns(1, lbasize=4096, claim_class="btt2", name="renamed", size=32 * MiB), ns(3, size=4096)],
    [],
    [ns(2, claim_class="btt")],
]


@pytest.mark.parametrize("version", ["1.2", "1.1"])
@pytest.mark.parametrize("grain", [8, 512])
def test_every_crash_point_leaves_the_old_or_the_new_state(version, grain):
    medium = image(version)
    area = LabelArea(medium, AREA)
    checked = 0
    for wanted in UPDATES:
        if version == "1.1":
            wanted = [NamespaceLabel(**{**vars(label), "claim_class": "none"}) for label in wanted]
        before = bytes(medium.data)
        old = keys(area)
        medium.writes.clear()
        area.update(wanted)
        new = keys(area)
        assert new == [label.key() for label in sorted(wanted, key=lambda label: label.offset)]
        writes = list(medium.writes)
        for n in range(len(writes) + 1):  # the first n writes landed in full...
            state = bytearray(before)
            for off, data in writes[:n]:
                state[off:off + len(data)] = data
            variants = [bytes(state)]
            if n < len(writes):  # ...and write n+1 was torn
                off, data = writes[n]
                for torn in torn_variants(bytes(state[off:off + len(data)]), data, grain):
                    s = bytearray(state)
                    s[off:off + len(data)] = torn
                    variants.append(bytes(s))
            for v in variants:
                got = keys(LabelArea(medium.copy(v), AREA))
                assert got in (old, new), (n, wanted)
                checked += 1
        # only the complete set of writes gives the new state
        assert keys(LabelArea(medium.copy(before), AREA)) == old
    assert checked > 20


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_torn_writes_in_any_8_byte_pattern(data):
    """Pmem (and QEMU's _DSM memcpy) only promise 8-byte atomicity: any subset of a write's
    8-byte words may have landed."""
    medium = image()
    area = LabelArea(medium, AREA)
    for wanted in UPDATES[:3]:
        area.update(wanted)
    before, old = bytes(medium.data), keys(area)
    medium.writes.clear()
    area.update(UPDATES[3])
    new, writes = keys(area), list(medium.writes)
    n = data.draw(st.integers(0, len(writes) - 1), label="writes landed")
    state = bytearray(before)
    for off, chunk in writes[:n]:
        state[off:off + len(chunk)] = chunk
    off, chunk = writes[n]
    words = len(chunk) // 8
    landed = data.draw(st.sets(st.integers(0, words - 1)), label="words of the torn write")
    for w in landed:
        state[off + 8 * w:off + 8 * w + 8] = chunk[8 * w:8 * w + 8]
    assert keys(LabelArea(medium.copy(bytes(state)), AREA)) in (old, new)


# ---- damage: a clean error or a valid state --------------------------------------------------

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 4 * 1024 - 1), st.binary(min_size=1, max_size=16)),
                min_size=1, max_size=8),
       st.sampled_from(["1.2", "1.1"]))
def test_random_damage_never_crashes(damage, version):
    medium = image(version, pmem=4 * MiB)
    area = LabelArea(medium, AREA)
    area.update([ns(0, offset=0, size=MiB), ns(1, offset=MiB, size=MiB)])
    area.update([ns(0, offset=0, size=MiB, name="a"), ns(1, offset=MiB, size=2 * MiB)])
    # Damage lands in the index blocks and the first slots, where the live bytes are.
    for off, blob in damage:
        medium.data[off:off + len(blob)] = blob
    try:
        back = LabelArea(medium.copy(), AREA)
    except LabelError as e:
        assert e.errno in (errno.ENODEV, errno.EUCLEAN) and e.message
        return
    labels = back.namespaces()
    for label in labels:
        assert 0 <= label.offset and label.offset + label.size <= back.pmem_size
    assert len({label.uuid for label in labels}) == len(labels)
    try:
        back.update(labels[:1])  # a damaged-but-valid area can still be updated
    except LabelError as e:
        assert e.errno in (errno.EINVAL, errno.ENOSPC, errno.EUCLEAN)
