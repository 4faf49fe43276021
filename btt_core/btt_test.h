/*
 * btt_test.h - the test build's additions: switches that break the engine on purpose, and
 * hooks that reach inside an open BTT.
 *
 * cffi_build.py compiles them in with BTT_MUTATIONS=1 (-DBTT_MUTATIONS) as the module
 * btt_core._btt_cffi_test (tests/testbuild.py); the production module has none of this.
 * The crash and concurrency tests prove that each one is caught. Python names them by the
 * kebab-case of the enum name without its prefix (map-before-flog, ...).
 */
#ifndef BTT_TEST_H
#define BTT_TEST_H

#include <stdint.h>

struct btt;

enum {
	BTT_MUT_NONE = 0,
	BTT_MUT_MAP_BEFORE_FLOG = 1,
	BTT_MUT_FLOG_BEFORE_DATA_DURABLE = 2,
	BTT_MUT_REUSE_BEFORE_COMMIT = 3,
	BTT_MUT_REWRITE_DURING_COMMIT = 4, /* an LBA being committed written again at once */
	BTT_MUT_JOURNAL_RETIRED_EARLY = 5, /* the journal calls an epoch committed too soon */
	BTT_MUT_REPLAY_ONE_EPOCH = 6,      /* replay ignores the epoch filled during a commit */
	BTT_MUT_NO_RTT_WAIT = 7,           /* writers reuse blocks that readers are still copying */
	BTT_MUT_NO_JOURNAL = 8,            /* group mode runs without its intent journal */
	BTT_MUT_FLUSH_BEFORE_BARRIER2 = 9, /* a FLUSH/FUA is acknowledged before the commit's
					    * second barrier (its flog may not be durable) */
};
extern int btt_test_mutation;

/* Hooks that reach inside an open BTT. */
/* Set raw flag bits on a sector's map entry (error injection: E = media error). */
int btt_debug_set_map_flags(struct btt *b, uint64_t lba, uint32_t flags);
/* Tests: runs a group commit one step at a time, so that writes can be staged between
 * its steps as they are while the committer's barriers run. The first call takes the
 * filling epoch (if anything is staged), the next ones run its steps (barrier, flog,
 * barrier, map; in the mutation's order) and the last retires it. Returns 1 while the
 * commit is open, 0 when none is, or a negative errno. A write that must wait for the
 * commit runs its remaining steps itself. */
int btt_debug_commit_step(struct btt *b);
/* Tests: marks the first `count` read-tracking slots of every arena taken, as readers
 * parked inside a read would hold them (0 frees them again). Call with no reads running. */
void btt_debug_hold_rtt(struct btt *b, uint32_t count);

#endif
