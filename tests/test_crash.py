"""Crash consistency: recorded-write crash states (power loss and kill -9) and mutation checks."""
import os
import random

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from crashsim import E_FLAG, GEOMETRIES, Z_FLAG, Op, explore, record

LONG = bool(os.environ.get("BTT_LONG"))
WORKLOADS = 300 if LONG else 60
STATES_PER_WORKLOAD = 400 if LONG else 100
TOTAL = {"states": 0}

# A hot set of LBAs near the start and the arena boundary makes rewrites and conflicts common.
lbas = st.one_of(st.integers(0, 12), st.integers(3829 - 6, 3829 + 6), st.integers(0, 1 << 20))
op = st.one_of(
    st.builds(Op, kind=st.just("write"), lba=lbas, n=st.integers(1, 4), fua=st.booleans()),
    st.builds(Op, kind=st.just("write"), lba=lbas, n=st.just(1), fua=st.just(False)),
    st.builds(Op, kind=st.just("zero"), lba=lbas, n=st.integers(1, 3), fua=st.booleans()),
    st.builds(Op, kind=st.just("flush")),
    # Steps of a pipelined group commit (five close one): writes in between fill the next
    # epoch while the commit's barriers and flog/map writes are under way.
    st.builds(Op, kind=st.just("step")),
    st.builds(Op, kind=st.just("step")),
)


@pytest.mark.testbuild  # steps of a commit and preflags need the test build's hooks
@settings(max_examples=WORKLOADS, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(geo=st.sampled_from(GEOMETRIES), durability=st.sampled_from(["group", "strict", "none"]),
       ops=st.lists(op, min_size=1, max_size=18),
       preflags=st.dictionaries(st.integers(0, 12), st.sampled_from([E_FLAG, Z_FLAG]), max_size=2),
       seed=st.integers(0, 2**32))
# Found by the long run: a FLUSH with nothing staged must still sync zero-flag map writes.
@example(geo=GEOMETRIES[0], durability="group", seed=0, preflags={},
         ops=[Op("write", 0, 1), Op("zero", 0, 1), Op("flush")])
def test_crash_states(geo, durability, ops, preflags, seed):
    rec = record(geo, durability, ops, preflags)
    n, problems = explore(rec, random.Random(seed), STATES_PER_WORKLOAD)
    TOTAL["states"] += n
    assert not problems, "\n".join(problems[:10])


@pytest.mark.testbuild
def test_crash_state_count():
    """The default suite covers at least 5,000 crash states (100,000 with BTT_LONG=1) in
    test_crash_states, which runs before it in the same (test-build) process."""
    if TOTAL["states"] == 0:
        pytest.skip("run together with test_crash_states")
    assert TOTAL["states"] >= (100_000 if LONG else 5_000), TOTAL["states"]


# ---- mutation checks: a harness that cannot fail proves nothing ---------------------------

def hunt(mutation, durability, ops, tries=3000, kinds=("power", "process"), seed=1):
    rec = record(GEOMETRIES[0], durability, ops, mutation=mutation)
    _, problems = explore(rec, random.Random(seed), tries, kinds)
    return problems


WORKLOAD = [Op("write", 1, 1), Op("write", 2, 2), Op("write", 1, 1), Op("flush"),
            Op("write", 7, 1), Op("write", 1, 1), Op("flush"), Op("write", 9, 3, fua=True)]


@pytest.mark.testbuild
def test_correct_engine_passes_the_mutation_workloads():
    for durability in ("group", "strict"):
        assert hunt(None, durability, WORKLOAD) == []


@pytest.mark.testbuild
@pytest.mark.parametrize("durability", ["group", "strict"])
def test_harness_catches_map_written_before_flog(durability):
    problems = hunt("map-before-flog", durability, WORKLOAD, kinds=("power",))
    assert problems, "map-before-flog went unnoticed"


@pytest.mark.testbuild
@pytest.mark.parametrize("durability", ["group", "strict"])
def test_harness_catches_flog_before_data_is_durable(durability):
    problems = hunt("flog-before-data-durable", durability, WORKLOAD, kinds=("power",))
    assert problems, "flog-before-data went unnoticed"


@pytest.mark.testbuild
@pytest.mark.parametrize("kind", ["power", "process"])
def test_harness_catches_reuse_of_a_freed_block_before_its_commit(kind):
    problems = hunt("reuse-before-commit", "group", WORKLOAD, kinds=(kind,))
    assert problems, "early reuse of a freed block went unnoticed"


# A commit opened by the committer (step), writes while it runs (one to an LBA it carries),
# and its remaining steps run by the write that must wait for it.
PIPELINED = [Op("write", 1, 1), Op("write", 2, 2), Op("step"), Op("step"), Op("write", 7, 1),
             Op("step"), Op("write", 1, 1), Op("write", 9, 1), Op("step"), Op("write", 4, 1),
             Op("flush")]


@pytest.mark.testbuild
def test_correct_engine_passes_the_pipelined_workload():
    assert hunt(None, "group", PIPELINED) == []


@pytest.mark.testbuild
def test_harness_catches_a_rewrite_of_an_lba_being_committed():
    problems = hunt("rewrite-during-commit", "group", PIPELINED)
    assert problems, "a rewrite during the commit of the LBA went unnoticed"


@pytest.mark.testbuild
def test_harness_catches_a_journal_that_retires_an_epoch_before_its_commit():
    problems = hunt("journal-retired-early", "group", PIPELINED, kinds=("process",))
    assert problems, "a journal header written before the commit went unnoticed"


@pytest.mark.parametrize("durability", ["group", "strict"])
@pytest.mark.testbuild
def test_harness_catches_a_flush_acknowledged_before_the_second_barrier(durability):
    """The flog entries of a FLUSH's commit must be durable before the FLUSH is acknowledged:
    without the commit's second barrier, a power loss right after can drop them (and a
    freed block reused meanwhile is then still mapped)."""
    problems = hunt("flush-before-barrier2", durability, WORKLOAD, kinds=("power",))
    assert problems, "a FLUSH acknowledged before its flog was durable went unnoticed"


@pytest.mark.testbuild
def test_harness_catches_a_replay_that_ignores_the_epoch_filled_during_a_commit():
    problems = hunt("replay-one-epoch", "group", PIPELINED, kinds=("process",))
    assert problems, "writes staged while a commit ran were lost unnoticed"


# ---- truly parallel writers ---------------------------------------------------------------

PARALLEL_WORKLOADS = 40 if LONG else 12
PARALLEL_THREADS = 4


def parallel_workload(rng: random.Random):
    """Four threads, each writing, zeroing and flushing LBAs of its own (two map pages
    apart), all at once: they share lanes, epochs, commits and the journal."""
    ops, threads = [], []
    for t in range(PARALLEL_THREADS):
        for _ in range(rng.randint(3, 10)):
            r = rng.random()
            base = t * 16 if rng.random() < 0.7 else 2048 + t * 16
            if r < 0.15:
                ops.append(Op("flush"))
            elif r < 0.3:
                ops.append(Op("zero", base + rng.randint(0, 13), rng.randint(1, 3),
                              fua=rng.random() < 0.3))
            else:
                ops.append(Op("write", base + rng.randint(0, 13), rng.randint(1, 3),
                              fua=rng.random() < 0.2))
            threads.append(t)
    return ops, threads


def test_power_loss_after_a_fua_zero_and_two_rewrites():
    """Found by make test-long: a lane's seq has three values and its free block cycles
    back, so after a same-boot power cut that lost the journal header's rewrites, op 0's
    entry looked like it continued its lane, and its replay brought back the data from
    before the FUA zero. An entry now applies only while the map holds the block it
    replaced."""
    ops = [Op("write", 0, 1), Op("zero", 0, 1, fua=True), Op("write", 1, 1, fua=True),
           Op("write", 0, 1), Op("write", 0, 1)]
    rec = record(GEOMETRIES[0], "group", ops, {})
    _, problems = explore(rec, random.Random(0), 400)
    assert not problems, "\n".join(problems[:5])


@pytest.mark.parametrize("seed", range(PARALLEL_WORKLOADS))
def test_crash_states_with_parallel_writers(seed):
    rng = random.Random(seed)
    geo = rng.choice(GEOMETRIES)
    # Not "none": without barriers nothing takes long enough for the threads to meet.
    durability = rng.choice(["group", "strict"])
    ops, threads = parallel_workload(rng)
    rec = record(geo, durability, ops, threads=threads)
    spans = sorted((op.start, op.end, t) for op, t in zip(ops, threads, strict=True))
    overlaps = sum(1 for i, a in enumerate(spans) for b in spans[i + 1:]
                   if b[0] < a[1] and b[2] != a[2])
    assert overlaps, "the threads ran one after another: nothing parallel was tested"
    n, problems = explore(rec, rng, STATES_PER_WORKLOAD)
    TOTAL["states"] += n
    assert not problems, "\n".join(problems[:10])


@pytest.mark.testbuild
@pytest.mark.parametrize("durability", ["group", "strict"])
def test_parallel_harness_catches_map_written_before_flog(durability):
    rng = random.Random(7)
    found = []
    for _ in range(5):  # thread interleavings vary from run to run: several workloads
        ops, threads = parallel_workload(rng)
        rec = record(GEOMETRIES[0], durability, ops, mutation="map-before-flog",
                     threads=threads)
        found += explore(rec, rng, 600, ("power",))[1]
        if found:
            break
    assert found, "map-before-flog with parallel writers went unnoticed"
