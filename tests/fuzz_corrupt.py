"""Corrupt-metadata fuzzing: damaged info blocks, flog, map and arena chains must give a
clear error (or be served safely), never a crash or an out-of-bounds access.

Imported by test_corrupt.py, and run as a script against a build of the C core with
AddressSanitizer and UBSan (`python fuzz_corrupt.py ITERATIONS SEED`).
"""
import errno
import random
import struct
import sys

from btt_core import Btt, BttError, Io, pack_info, unpack_info

MiB = 1 << 20
ALLOWED = {errno.ENODEV, errno.EUCLEAN, errno.EIO, errno.EINVAL, errno.ENXIO, errno.EROFS}
GEOMETRIES = [("1.1", 4096, 0, 20 * MiB), ("2.0", 512, 16 * MiB, 36 * MiB),
              ("1.1", 520, 16 * MiB, 40 * MiB)]
U32_EXTREMES = [0, 1, 255, 256, 257, 4095, 4096, 2**29, 2**30, 2**30 + 1, 2**31, 2**32 - 1]
U64_EXTREMES = [0, 4096, 2**24, 2**39, 2**40, 2**63, 2**64 - 4096, 2**64 - 1]
U32_FIELDS = ["flags", "external_lbasize", "external_nlba", "internal_lbasize", "internal_nlba",
              "nfree", "infosize"]
U64_FIELDS = ["nextoff", "dataoff", "mapoff", "logoff", "info2off"]


def base_image(version, lbasize, arena_max, size):
    io = Io.memory(size)
    Btt.format_io(io, size=size, sector_size=lbasize, version=version, arena_max=arena_max)
    b = Btt.open_io(io, durability="strict")
    rng = random.Random(7)
    for i in range(40):
        b.write(rng.randrange(b.nlba), bytes([i + 1]) * b.sector_size)
    arenas = b.arenas
    b.close()
    return io, arenas


def damage(io, arenas, version, rng):
    """Applies one random kind of damage; returns its name."""
    a = rng.choice(arenas)
    base = (4096 if version == "1.1" else 0) + a["start"]
    kind = rng.choice(["info_bytes", "info_field", "info_field", "flog", "map", "backup"])
    if kind == "info_bytes":
        for _ in range(rng.randint(1, 8)):
            io.poke(base + rng.randrange(4096), bytes([rng.randrange(256)]))
    elif kind in ("info_field", "backup"):
        off = base if kind == "info_field" else base + a["info2off"]
        fields = unpack_info(io.read(off, 4096))
        fields.pop("checksum_ok")
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.5:
                name = rng.choice(U32_FIELDS)
                near = fields[name] + rng.randint(-300, 300)
                fields[name] = rng.choice(U32_EXTREMES + [near]) % 2**32
            else:
                name = rng.choice(U64_FIELDS)
                near = fields[name] + rng.choice([-4096, 4096])
                fields[name] = rng.choice(U64_EXTREMES + [near]) % 2**64
        io.poke(off, pack_info(fields))  # a valid checksum: validation must catch the field
    elif kind == "flog":
        for _ in range(rng.randint(1, 6)):
            lane, slot, word = rng.randrange(256), rng.randrange(4), rng.randrange(4)
            value = rng.choice(U32_EXTREMES + [rng.randrange(2**32)])
            io.poke(base + a["logoff"] + lane * 64 + slot * 16 + word * 4, struct.pack("<I", value))
    else:
        for _ in range(rng.randint(1, 20)):
            lba = rng.randrange(a["external_nlba"])
            nlba = a["internal_nlba"]
            value = rng.choice([rng.randrange(2**32), 0xC0000000 | rng.randrange(nlba),
                                0xC0000000 | (nlba + rng.randrange(1000)), 0x40000000])
            io.poke(base + a["mapoff"] + 4 * lba, struct.pack("<I", value))
    return kind


def expect_clear(e):
    assert e.errno in ALLOWED, f"unexpected errno {e.errno}: {e}"
    assert str(e).strip(), "error without a message"


def exercise(io, rng):
    """Opens and uses a damaged image; returns 'refused' or 'served'."""
    try:
        b = Btt.open_io(io, durability=rng.choice(["strict", "group", "none"]))
    except BttError as e:
        expect_clear(e)
        return "refused"
    try:
        lbas = [0, b.nlba - 1] + [rng.randrange(b.nlba) for _ in range(60)]
        for lba in lbas:
            try:
                b.read(lba, min(8, b.nlba - lba))
            except BttError as e:
                expect_clear(e)
        for lba in lbas[:8]:
            try:
                b.write(lba, bytes(b.sector_size))
            except BttError as e:
                expect_clear(e)
        b.check()
    finally:
        try:
            b.close()
        except BttError as e:
            expect_clear(e)
    return "served"


def run(iterations, seed):
    rng = random.Random(seed)
    bases = [(base_image(*g), g[0]) for g in GEOMETRIES]
    outcomes = {}
    for _ in range(iterations):
        (pristine, arenas), version = rng.choice(bases)
        io = pristine.clone()
        kind = damage(io, arenas, version, rng)
        result = exercise(io, rng)
        outcomes[(kind, result)] = outcomes.get((kind, result), 0) + 1
        io.close()
    return outcomes


if __name__ == "__main__":
    print(run(int(sys.argv[1]), int(sys.argv[2])))
