"""Arena layout arithmetic: btt-format.md §4 and the conformance table of §9."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from btt_core import SECTOR_SIZES, BttError, compute_layout

MiB, GiB = 1 << 20, 1 << 30

# §9, transcribed: (raw size, lbasize, version) -> None (rejected) or
# [(ns_off, external_nlba, internal_nlba, nfree, dataoff, mapoff, logoff, info2off, nextoff)], capacity
TABLE = {
    (4 * MiB, 512, "1.1"): None,
    (4 * MiB, 512, "2.0"): None,
    (4 * MiB, 4096, "1.1"): None,
    (4 * MiB, 4096, "2.0"): None,
    (16 * MiB, 512, "1.1"): None,
    (16 * MiB, 512, "2.0"): ([(0x0, 32202, 32458, 256, 0x1000, 0xfdb000, 0xffb000, 0xfff000, 0x0)],
                             16487424),
    (16 * MiB, 4096, "1.1"): None,
    (16 * MiB, 4096, "2.0"): ([(0x0, 3829, 4085, 256, 0x1000, 0xff7000, 0xffb000, 0xfff000, 0x0)],
                              15683584),
    (1 * GiB, 512, "1.1"): ([(0x1000, 2080575, 2080831, 256, 0x1000, 0x3f80a000, 0x3fffa000,
                              0x3fffe000, 0x0)], 1065254400),
    (1 * GiB, 512, "2.0"): ([(0x0, 2080583, 2080839, 256, 0x1000, 0x3f80b000, 0x3fffb000,
                              0x3ffff000, 0x0)], 1065258496),
    (1 * GiB, 4096, "1.1"): ([(0x1000, 261624, 261880, 256, 0x1000, 0x3fefa000, 0x3fffa000,
                               0x3fffe000, 0x0)], 1071611904),
    (1 * GiB, 4096, "2.0"): ([(0x0, 261625, 261881, 256, 0x1000, 0x3fefb000, 0x3fffb000,
                               0x3ffff000, 0x0)], 1071616000),
    (513 * GiB, 512, "1.1"): ([
        (0x1000, 1065417932, 1065418188, 256, 0x1000, 0x7f01fbb000, 0x7fffffb000, 0x7ffffff000, 0x8000000000),
        (0x8000001000, 2080575, 2080831, 256, 0x1000, 0x3f80a000, 0x3fffa000, 0x3fffe000, 0x0)],
        546559235584),
    (513 * GiB, 512, "2.0"): ([
        (0x0, 1065417932, 1065418188, 256, 0x1000, 0x7f01fbb000, 0x7fffffb000, 0x7ffffff000, 0x8000000000),
        (0x8000000000, 2080583, 2080839, 256, 0x1000, 0x3f80b000, 0x3fffb000, 0x3ffff000, 0x0)],
        546559239680),
    (513 * GiB, 4096, "1.1"): ([
        (0x1000, 134086520, 134086776, 256, 0x1000, 0x7fe007b000, 0x7fffffb000, 0x7ffffff000, 0x8000000000),
        (0x8000001000, 261624, 261880, 256, 0x1000, 0x3fefa000, 0x3fffa000, 0x3fffe000, 0x0)],
        550289997824),
    (513 * GiB, 4096, "2.0"): ([
        (0x0, 134086520, 134086776, 256, 0x1000, 0x7fe007b000, 0x7fffffb000, 0x7ffffff000, 0x8000000000),
        (0x8000000000, 261625, 261881, 256, 0x1000, 0x3fefb000, 0x3fffb000, 0x3ffff000, 0x0)],
        550290001920),
    (1200 * GiB, 512, "1.1"): ([
        (0x1000, 1065417932, 1065418188, 256, 0x1000, 0x7f01fbb000, 0x7fffffb000, 0x7ffffff000, 0x8000000000),
        (0x8000001000, 1065417932, 1065418188, 256, 0x1000, 0x7f01fbb000, 0x7fffffb000, 0x7ffffff000, 0x8000000000),
        (0x10000001000, 366237201, 366237457, 256, 0x1000, 0x2ba8ae4000, 0x2bffffa000, 0x2bffffe000, 0x0)],
        1278501409280),
    (1200 * GiB, 512, "2.0"): ([
        (0x0, 1065417932, 1065418188, 256, 0x1000, 0x7f01fbb000, 0x7fffffb000, 0x7ffffff000, 0x8000000000),
        (0x8000000000, 1065417932, 1065418188, 256, 0x1000, 0x7f01fbb000, 0x7fffffb000, 0x7ffffff000, 0x8000000000),
        (0x10000000000, 366237209, 366237465, 256, 0x1000, 0x2ba8ae5000, 0x2bffffb000, 0x2bfffff000, 0x0)],
        1278501413376),
    (1200 * GiB, 4096, "1.1"): ([
        (0x1000, 134086520, 134086776, 256, 0x1000, 0x7fe007b000, 0x7fffffb000, 0x7ffffff000, 0x8000000000),
        (0x8000001000, 134086520, 134086776, 256, 0x1000, 0x7fe007b000, 0x7fffffb000, 0x7ffffff000, 0x8000000000),
        (0x10000001000, 46092067, 46092323, 256, 0x1000, 0x2bf5026000, 0x2bffffa000, 0x2bffffe000, 0x0)],
        1287229878272),
    (1200 * GiB, 4096, "2.0"): ([
        (0x0, 134086520, 134086776, 256, 0x1000, 0x7fe007b000, 0x7fffffb000, 0x7ffffff000, 0x8000000000),
        (0x8000000000, 134086520, 134086776, 256, 0x1000, 0x7fe007b000, 0x7fffffb000, 0x7ffffff000, 0x8000000000),
        (0x10000000000, 46092068, 46092324, 256, 0x1000, 0x2bf5027000, 0x2bffffb000, 0x2bfffff000, 0x0)],
        1287229882368),
}


def layout_for(size, lbasize, version):
    initial = 4096 if version == "1.1" else 0
    arenas = compute_layout(size - initial, lbasize)
    rows = [(initial + a["start"], a["external_nlba"], a["internal_nlba"], a["nfree"], a["dataoff"],
             a["mapoff"], a["logoff"], a["info2off"], a["nextoff"]) for a in arenas]
    sector = 4096 if lbasize >= 4096 else 512
    return rows, sum(a["external_nlba"] for a in arenas) * sector


@pytest.mark.parametrize("key", list(TABLE), ids=lambda k: f"{k[0] // MiB}MiB-{k[1]}-v{k[2]}")
def test_section9_table(key):
    size, lbasize, version = key
    expected = TABLE[key]
    if expected is None:
        with pytest.raises(BttError) as e:
            layout_for(size, lbasize, version)
        assert e.value.errno == 6  # ENXIO, as the kernel
        return
    assert layout_for(size, lbasize, version) == expected


def test_section9_1_hand_check():
    """16 MiB, 4096, v2.0 step by step (§9.1)."""
    (a,) = compute_layout(16 * MiB, 4096)
    assert a["internal_nlba"] == (16752640 - 4096) // 4100 == 4085
    assert a["external_nlba"] == 3829
    assert a["mapoff"] == 4096 + 16736256 == 0xFF7000
    assert a["info2off"] == 16 * MiB - 4096
    assert a["internal_nlba"] * 4096 <= a["mapoff"] - a["dataoff"]


def test_unsupported_lbasize_rejected():
    with pytest.raises(BttError) as e:
        compute_layout(GiB, 1024)
    assert e.value.errno == 22


@given(rawsize=st.integers(min_value=16 * MiB, max_value=1600 * GiB),
       lbasize=st.sampled_from(SECTOR_SIZES))
def test_layout_invariants(rawsize, lbasize):
    arenas = compute_layout(rawsize, lbasize)
    ilbs = (lbasize + 63) // 64 * 64
    assert len(arenas) >= 1
    for i, a in enumerate(arenas):
        last = i == len(arenas) - 1
        assert a["size"] == (a["size"] if last else 512 * GiB)
        assert 16 * MiB <= a["size"] <= 512 * GiB
        assert a["internal_lbasize"] == ilbs
        assert a["internal_nlba"] - a["external_nlba"] == 256
        assert a["internal_nlba"] < 2 ** 30
        assert a["dataoff"] + a["internal_nlba"] * ilbs <= a["mapoff"]
        assert a["mapoff"] + 4 * a["external_nlba"] <= a["logoff"]
        assert a["logoff"] + 256 * 64 <= a["info2off"] == (a["size"] // 4096) * 4096 - 4096
        assert (a["nextoff"] == 0) == last
        if not last:
            assert a["nextoff"] == a["size"]
    used = sum(a["size"] for a in arenas)
    assert rawsize - used < 16 * MiB
