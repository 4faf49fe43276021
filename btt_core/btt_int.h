/*
 * btt_int.h - the engine's internals, shared by its sources (btt.c and the files it names)
 * and by the checker (check.c). btt.h is the public API; nothing here is exported from
 * the module (-fvisibility=hidden).
 */
#ifndef BTT_INT_H
#define BTT_INT_H

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>

#include "btt.h"

/* Test-only breakage (btt_test.h): compiled into the test build alone (-DBTT_MUTATIONS,
 * tests/testbuild.py); in the production module MUTATED() is a constant 0 and the broken
 * branches vanish. */
#ifdef BTT_MUTATIONS
#include "btt_test.h"
#define MUTATED(name) (btt_test_mutation == BTT_MUT_##name)
#else
#define MUTATED(name) 0
#endif

/* A read-tracking slot: 0 when free, else RTT_TAKEN | count << 32 | first block: the
 * reader holding it may be copying blocks [first, first + count). */
#define RTT_TAKEN (1ull << 63)
/* Statistics are bumped by every thread without a lock: relaxed atomics keep them exact
 * and race-free (ThreadSanitizer checks the engine) for the cost of a locked add. */
#define STAT_ADD(b, field, n) __atomic_fetch_add(&(b)->stats.field, (n), __ATOMIC_RELAXED)
#define NSTRIPES 256u /* map locks per arena, as the kernel's nfree map locks */
#define STAGE_SLOTS 1024u /* hash slots per arena; > 2 x max staged entries (nfree <= 256) */

/* The per-thread error message of btt_errmsg() (errmsg.c), at most ERRMSG_MAX bytes.
 * Returns -err for `return seterr(...)`. */
#define ERRMSG_MAX 512
int seterr(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Shutdown while other threads may still call in (a namespace disabled under a connected
 * client): calls count themselves in `users`; shutdown sets `shut` and waits for the users
 * to drain; the memory is freed later, when the owner knows nobody can call any more. */
struct call_guard {
	_Atomic int users;
	_Atomic bool shut;
};

static inline int guard_enter(struct call_guard *g)
{
	atomic_fetch_add(&g->users, 1);
	if (atomic_load(&g->shut)) {
		atomic_fetch_sub(&g->users, 1);
		return seterr(ESHUTDOWN, "the namespace has been disabled");
	}
	return 0;
}

static inline void guard_leave(struct call_guard *g)
{
	atomic_fetch_sub(&g->users, 1);
}

/* Refuses new calls and waits for those inside; false if it was already shut. */
static inline bool guard_shut(struct call_guard *g)
{
	if (atomic_exchange(&g->shut, true))
		return false;
	while (atomic_load(&g->users) > 0)
		sched_yield();
	return true;
}

enum lane_state { LANE_CLEAN = 0, LANE_RESERVED, LANE_STAGED };

/* A lane owns one free block and one flog group (btt-format.md §6, §7.1). */
struct lane {
	uint32_t block;     /* the free block the next write in this lane fills */
	uint32_t seq;       /* sequence number the next flog entry gets (1..3) */
	uint8_t sub;        /* which live slot (index into log_index) the next entry goes to */
	uint8_t state;      /* enum lane_state, under btt.elock */
	uint32_t st_old;    /* while LANE_STAGED: the block the staged write frees */
};

/* A write whose data is in place and whose flog/map updates wait for the next commit. */
struct staged_entry {
	uint16_t arena, lane;
	uint32_t premap;
	uint32_t old;       /* old block, with BTT_MAP_E if the old entry was an error entry */
	uint32_t new_block;
	uint32_t seq;
	uint8_t slot;       /* flog slot (0..3) the entry goes to */
};

/* One flog slot as on media (four little-endian u32). */
struct flog_entry {
	uint32_t lba, old_map, new_map, seq;
};

/* One cached 4 KiB page of an arena's map (map.c). */
struct map_page {
	pthread_mutex_t lock; /* held across the media read or write that fills or updates it */
	bool held;            /* words hold map page `page` exactly as on the media */
	uint32_t page;
	uint32_t *words;      /* BTT_PG_SIZE / 4 raw map entries, allocated on first use */
};

struct arena {
	struct btt_arena_layout lay; /* geometry; offsets relative to the arena */
	struct btt_info info;         /* the primary info block as read or written */
	uint64_t base;                /* absolute backing-store offset of the arena */
	uint32_t sector_size;         /* data bytes per LBA the engine transfers */
	int log_index[2];             /* the two live slots: (0,1) or (0,2) */
	bool error_flag;              /* IB_FLAG_ERROR: writes refused */

	struct lane *lanes;      /* nfree */
	uint32_t clean_lanes;    /* lanes in LANE_CLEAN, under elock */
	uint32_t next_lane;      /* no clean lane has a lower index */
	uint8_t *flog_shadow;    /* in-memory copy of the flog groups, nfree * 64 bytes */

	_Atomic uint64_t *rtt;   /* nfree read-tracking slots (RTT_TAKEN above), or 0 */
	pthread_mutex_t stripes[NSTRIPES]; /* map locks */
	/* Staged map words, visible to readers: key premap+1 (0 = empty), value map word,
	 * or STAGE_RESERVED while the data is still being written. Changed under elock
	 * and the premap's stripe (a commit retires its own entries under the stripe
	 * only); read under the stripe. Two tables: the filling epoch's (btt.cur) and the
	 * one being committed; an LBA is in at most one of them. */
	_Atomic uint64_t stage[2][STAGE_SLOTS];
	_Atomic uint32_t nvisible[2]; /* published staged entries (readers skip lookups at 0) */
	uint16_t stage_used[2][STAGE_SLOTS]; /* slots taken since the last reset (under elock) */
	uint32_t nstage_used[2];   /* above STAGE_SLOTS: the list overflowed, clear them all */
	uint32_t nfilling;         /* entries the filling epoch staged in this arena */
	_Atomic uint32_t readers;  /* threads inside read_run (writers skip the RTT scan at 0) */
	struct map_page *mcache;   /* direct-mapped: map page i lives in slot i % mc_slots */
	uint32_t mc_slots;         /* a power of two */
	/* Bit i: map page i is a hole in the file (reads as zeros, i.e. identity entries).
	 * Set at open only; cleared under the page's slot lock before the page is written. */
	_Atomic uint64_t *map_hole;
	/* Bit i: bytes [i * DATA_HOLE_UNIT, +DATA_HOLE_UNIT) of the data area are a hole;
	 * set at open only, cleared before any data block in them is written (map.c). */
	_Atomic uint64_t *data_hole;
};

struct btt {
	struct btt_io *io;
	struct btt_io *journal;
	uint64_t ns_offset, ns_size, btt_offset; /* btt_offset: absolute start of arena 0 */
	int narenas;
	struct arena *arenas;
	uint64_t nlba;
	uint32_t sector_size, lbasize;
	uint8_t uuid[16];
	uint8_t boot_id[16];
	int readonly;
	int durability;

	/* The epoch lock: lane allocation, staging, the start and end of a commit, the
	 * journal. A commit's I/O runs without it, so the next epoch fills meanwhile (the
	 * lanes the commit holds stay staged until it ends). Readers never take it. */
	pthread_mutex_t elock;
	pthread_cond_t econd;
	uint32_t inflight;      /* reserved lanes whose data write is still running */
	uint32_t nstaged;       /* staged entries of the filling epoch */
	struct staged_entry *staged; /* in staging order, narenas * 256 at most */
	uint64_t epoch;         /* the filling epoch */
	int cur;                /* its stage tables: arena.stage[cur] */
	bool committing;        /* epoch - 1 is being committed (cstaged, stage[cur ^ 1]) */
	uint32_t ncstaged;
	struct staged_entry *cstaged;
	int cstep;              /* a commit stepped by a test (btt_debug_commit_step): next
				 * step, or -1 when none is open */
	bool kick;              /* the committer is asked to commit the filling epoch now */
	uint32_t journal_next;  /* next journal entry index in this epoch */
	int failed;             /* sticky error after a failed commit: -EIO */
	bool unsynced_zero;     /* zero-flag map writes not yet covered by a barrier */

	pthread_t timer;
	pthread_cond_t tcond; /* the timer's own: econd is signalled by every write */
	bool timer_running;
	bool timer_stop;
	unsigned timer_ms;

	struct btt_stats stats;

	struct call_guard guard;
};

static inline uint32_t map_resolve(uint32_t entry, uint32_t premap)
{
	return (entry & (BTT_MAP_Z | BTT_MAP_E)) == 0 ? premap : (entry & BTT_MAP_MASK);
}

/* Little-endian fields of on-media structures. */
static inline uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static inline uint32_t get32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline uint64_t get64(const uint8_t *p) { return get32(p) | (uint64_t)get32(p + 4) << 32; }
static inline void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8); }
static inline void put32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}
static inline void put64(uint8_t *p, uint64_t v)
{
	put32(p, (uint32_t)v), put32(p + 4, (uint32_t)(v >> 32));
}

static inline bool is_zero(const void *buf, size_t len)
{
	const uint8_t *p = buf;
	for (size_t i = 0; i < len; i++)
		if (p[i])
			return false;
	return true;
}

/* Makes every completed write durable; a no-op in durability mode "none". */
static inline int barrier(struct btt *b)
{
	if (b->durability == BTT_DUR_NONE)
		return 0;
	STAT_ADD(b, syncs, 1);
	return b->io->ops->sync(b->io);
}

/* A block-status answer being built (extents.c, rawio.c): extents of the caller's array. */
struct extent_list {
	struct btt_extent *v;
	uint32_t n, max;
	bool full; /* an extent did not fit: the answer ends where the last one does */
};

/* ---- flog.c ---- */
extern const uint32_t seq_next[4];
void flog_slot_get(const uint8_t *group, int slot, struct flog_entry *e);
void flog_slot_put(uint8_t *group, int slot, const struct flog_entry *e);
int flog_detect_scheme(const uint8_t *flog, uint32_t nfree, int aidx, int idx[2]);
int flog_newest(const struct flog_entry *e0, const struct flog_entry *e1);

/* ---- layout.c ---- */
extern const uint8_t BTT_SIG[16];
uint32_t data_bytes(uint32_t lbasize);

/* ---- map.c ---- */
#define MAP_PAGE_WORDS (BTT_PG_SIZE / 4)
#define DATA_HOLE_UNIT (64u << 10) /* bytes of the data area per bit: 1 MiB of bits per 512 GiB */
#define STAGE_EMPTY 0ull
#define STAGE_TOMB 0xFFFFFFFFull
#define STAGE_RESERVED 0x80000000ull /* in the key: data still being written */
uint64_t map_off(const struct arena *a, uint32_t premap);
uint64_t block_off(const struct arena *a, uint32_t block);
int map_cache_init(struct arena *a);
void map_cache_free(struct arena *a);
bool hole_bit(_Atomic uint64_t *bits, uint64_t u);
uint64_t data_hole_units(const struct arena *a);
int holes_init(struct btt *b, struct arena *a);
bool map_page_is_hole(struct arena *a, uint32_t page);
void map_page_written(struct arena *a, uint32_t page);
bool block_is_hole(const struct arena *a, uint32_t block);
void block_written(struct arena *a, uint32_t block);
struct map_page *map_slot(struct arena *a, uint32_t page);
int map_cached_locked(struct btt *b, struct arena *a, struct map_page *s, uint32_t page,
		      bool *hit);
int map_get(struct btt *b, struct arena *a, uint32_t premap, uint32_t n, uint32_t *out);
int map_put(struct btt *b, struct arena *a, uint32_t premap, uint32_t n, const uint32_t *words);
int arena_map_read(struct btt *b, struct arena *a, uint32_t premap, uint32_t *entry);
int arena_map_write(struct btt *b, struct arena *a, uint32_t premap, uint32_t entry);
pthread_mutex_t *stripe_of(struct arena *a, uint32_t premap);
int stage_find(struct arena *a, int t, uint32_t premap);
int staged_lookup(struct arena *a, uint32_t premap, uint32_t *word);
void stage_insert(struct arena *a, int t, uint32_t premap, uint64_t keyflags, uint32_t word);
void stage_set(struct arena *a, int t, int i, uint32_t premap, uint64_t keyflags,
	       uint32_t word);
void stage_reset(struct arena *a, int t);
struct arena *arena_of(struct btt *b, uint64_t lba, uint32_t *premap);
int check_range(struct btt *b, uint64_t lba, uint64_t count);

/* ---- read.c ---- */
#define RTT_PENDING RTT_TAKEN /* a slot taken before any block is published in it */
void rtt_wait(struct arena *a, uint32_t block);
int do_read(struct btt *b, uint64_t lba, uint64_t count, void *buf);

/* ---- journal.c: its layout (written there, replayed by open.c) ---- */
#define J_MAGIC "BTTJRNL1"
#define J_VERSION 3u /* 3: entries hold the block they replace (+44) */
#define J_ENTRY_MAGIC 0x544E454Au
#define J_HDR 64u
#define J_ENTRIES 4096u
#define J_ENTRY 64u
uint64_t journal_region(const struct btt *b, uint64_t epoch);
int journal_write_header(struct btt *b, uint64_t oldest);
int journal_append(struct btt *b, uint32_t aidx, uint32_t lane, uint32_t premap,
		   uint32_t block, uint32_t seq, uint32_t data_crc, uint32_t old);

/* ---- commit.c ---- */
void wait_commit_locked(struct btt *b);
void quiesce_locked(struct btt *b);
int commit_locked(struct btt *b, uint64_t epoch);
int do_flush(struct btt *b);

/* ---- write.c ---- */
int stage_entry(struct btt *b, struct arena *a, uint32_t lane, uint32_t premap,
		uint32_t block);
void unreserve_lane(struct btt *b, struct arena *a, uint32_t lane, uint32_t premap);
int do_write(struct btt *b, uint64_t lba, uint64_t count, const void *buf, int flags);
int do_set_zero(struct btt *b, uint64_t lba, uint64_t count, int flags);

/* ---- extents.c ---- */
bool extent_add(struct extent_list *l, uint64_t offset, uint64_t length, uint32_t type);
void extents_clip(struct extent_list *l, uint64_t off, uint64_t len);
int do_block_status(struct btt *b, uint64_t off, uint64_t len, struct btt_extent *out,
		    uint32_t max, uint32_t *n);

/* ---- open.c ---- */
int validate_arena(const struct btt_info *ib, int idx, uint64_t start, uint64_t rawsize,
		   const struct btt_info *first, struct btt_arena_layout *l);
int read_info(struct btt_io *io, uint64_t off, const struct btt_open_params *p, struct btt_info *ib);
void free_btt(struct btt *b);

/* ---- btt.c ---- */
struct lane *lane_view(struct arena *a, uint32_t i, uint32_t *free_block);

#endif
