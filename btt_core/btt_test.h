/*
 * btt_test.h - switches that break the engine on purpose, in the test build only.
 *
 * cffi_build.py compiles them in with BTT_MUTATIONS=1 (-DBTT_MUTATIONS) as the module
 * btt_core._btt_cffi_test (tests/testbuild.py); the production module has none of this.
 * The crash and concurrency tests prove that each one is caught. Python names them by the
 * kebab-case of the enum name without its prefix (map-before-flog, ...).
 */
#ifndef BTT_TEST_H
#define BTT_TEST_H

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

#endif
