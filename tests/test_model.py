"""Model-based test: random writes, reads, flushes and reopens against a dict model."""
import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from btt_core import Btt, Io

from conftest import MiB, pattern

GEOMETRIES = [
    # (namespace size, lbasize, version, arena_max): small multi-arena chains come from
    # arena_max; the arithmetic is the kernel's, only the 512 GiB cap is lowered.
    (20 * MiB, 4096, "1.1", 0),
    (20 * MiB, 512, "2.0", 0),
    (50 * MiB, 4096, "2.0", 16 * MiB),
    (40 * MiB, 520, "1.1", 16 * MiB),
]


class BttModel(RuleBasedStateMachine):
    @initialize(geo=st.sampled_from(GEOMETRIES),
                durability=st.sampled_from(["group", "strict", "none"]))
    def setup(self, geo, durability):
        size, lbasize, version, arena_max = geo
        self.io = Io.memory(size)
        self.journal = Io.memory(1 << 20)
        Btt.format_io(self.io, size=size, sector_size=lbasize, version=version, arena_max=arena_max)
        self.durability = durability
        self.btt = self._open()
        self.ss = self.btt.sector_size
        self.model = {}
        self.tag = 0
        self.initial = {}

    def _open(self):
        return Btt.open_io(self.io, durability=self.durability, journal=self.journal)

    def lbas(self):
        return st.integers(min_value=0, max_value=self.btt.nlba - 1)

    def _expect(self, lba):
        if lba in self.model:
            return self.model[lba]
        if lba not in self.initial:  # identity entries read whatever the data block holds
            self.initial[lba] = self.btt.read(lba, 1)
        return self.initial[lba]

    @rule(data=st.data(), n=st.integers(min_value=1, max_value=40), fua=st.booleans())
    def write(self, data, n, fua):
        edges = [0, self.btt.nlba - n] + [a["lba_start"] - n // 2 for a in self.btt.arenas[1:]]
        lba = data.draw(st.one_of(st.sampled_from([max(0, e) for e in edges]),
                                  st.integers(0, self.btt.nlba - n)))
        self.tag += 1
        for i in range(n):  # remember initial content before overwriting
            self._expect(lba + i)
        buf = b"".join(pattern(self.tag, lba + i, self.ss) for i in range(n))
        self.btt.write(lba, buf, fua=fua)
        for i in range(n):
            self.model[lba + i] = buf[i * self.ss:(i + 1) * self.ss]

    @rule(data=st.data())
    def rewrite_same(self, data):
        """Rewrites of one LBA within an epoch force commits (rule 3 of the design)."""
        lba = data.draw(self.lbas())
        self._expect(lba)
        for _ in range(3):
            self.tag += 1
            buf = pattern(self.tag, lba, self.ss)
            self.btt.write(lba, buf)
            self.model[lba] = buf

    @rule(data=st.data(), n=st.integers(min_value=1, max_value=64))
    def read(self, data, n):
        lba = data.draw(st.integers(0, self.btt.nlba - n))
        got = self.btt.read(lba, n)
        for i in range(n):
            assert got[i * self.ss:(i + 1) * self.ss] == self._expect(lba + i), f"LBA {lba + i}"

    @rule()
    def flush(self):
        self.btt.flush()

    @rule(clean=st.booleans())
    def reopen(self, clean):
        if clean:
            self.btt.close()
        else:  # a process crash: nothing committed at close, the journal must cover it
            self.btt.abandon()
        self.btt = self._open()

    @precondition(lambda self: self.model)
    @rule()
    def check_written(self):
        for lba, want in list(self.model.items())[-20:]:
            assert self.btt.read(lba, 1) == want

    @invariant()
    def bitmap_rule(self):
        if hasattr(self, "btt"):
            r = self.btt.check()
            assert r["clean"], r["problems"]

    def teardown(self):
        if hasattr(self, "btt"):
            self.btt.close()


BttModel.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestBttModel = BttModel.TestCase
