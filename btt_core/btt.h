/*
 * btt.h - public interface of the BTT engine.
 *
 * The engine reads and writes the Linux kernel's Block Translation Table format
 * (drivers/nvdimm/btt.c; docs/engine.md) on top of a small I/O vtable,
 * so the same code runs over a file (production) and over memory (tests that record
 * every write and barrier to build crash images).
 *
 * Every function that can fail returns 0 or a negative errno and leaves a one-line
 * explanation in a per-thread buffer that btt_errmsg() returns.
 */
#ifndef BTT_H
#define BTT_H

#include <stddef.h>
#include <stdint.h>

/* ---- I/O backends (backend.c) ------------------------------------------------ */

struct btt_io;

struct btt_io_ops {
	/* Full-length transfer or a negative errno (a short read past EOF is -EIO). */
	int (*read)(struct btt_io *io, void *buf, size_t len, uint64_t off);
	int (*write)(struct btt_io *io, const void *buf, size_t len, uint64_t off);
	/* Make every completed write durable (fdatasync). */
	int (*sync)(struct btt_io *io);
	/* Make [off, off+len) read as zeros without necessarily writing them (hole punch). */
	int (*zero)(struct btt_io *io, uint64_t off, uint64_t len);
	/* Give holes in [off, off+len) storage (they keep reading zeros), so later writes
	 * there cannot fail for want of space. */
	int (*allocate)(struct btt_io *io, uint64_t off, uint64_t len);
	/* Holes read as zeros. next_data: the first offset >= off that may hold data (a
	 * backend that cannot tell answers off); next_hole: the first offset >= off in a
	 * hole, or the size. Both may round to the backend's block size. */
	uint64_t (*next_data)(struct btt_io *io, uint64_t off);
	uint64_t (*next_hole)(struct btt_io *io, uint64_t off);
	uint64_t (*size)(struct btt_io *io);
	void (*destroy)(struct btt_io *io);
};

struct btt_io {
	const struct btt_io_ops *ops;
};

/* create_mode: make the file if missing, with these permission bits (0: never create);
 * min_size: extend (sparsely) to at least this size. A file opened for writing, or created,
 * is opened without following a symbolic link at path and must be a regular file: the
 * server derives some of these paths itself (the journal), and a link or device planted
 * there must not redirect its writes. Read-only opens also accept block devices. */
int btt_file_open(const char *path, int readonly, unsigned create_mode, uint64_t min_size,
		  struct btt_io **out);
/* The (st_dev, st_ino) of the file a file backend has open; -EINVAL for memory images.
 * Lets a caller remove a path only while it still names the file it opened. */
int btt_file_ident(struct btt_io *io, uint64_t *dev, uint64_t *ino);
struct btt_io *btt_mem_new(uint64_t size);
struct btt_io *btt_mem_clone(struct btt_io *mem);
void btt_io_destroy(struct btt_io *io);
int btt_io_read(struct btt_io *io, void *buf, size_t len, uint64_t off);
int btt_io_write(struct btt_io *io, const void *buf, size_t len, uint64_t off);
int btt_io_sync(struct btt_io *io);
uint64_t btt_io_size(struct btt_io *io);
int btt_io_zero(struct btt_io *io, uint64_t off, uint64_t len);

/* Recording (memory backend only): every write and every sync becomes a record, stamped
 * with a clock shared by all memory images so records of two images can be merged. */
enum { BTT_REC_WRITE = 1, BTT_REC_SYNC = 2 };
int btt_mem_set_recording(struct btt_io *mem, int on);
size_t btt_mem_record_count(struct btt_io *mem);
int btt_mem_record_get(struct btt_io *mem, size_t i, int *kind, uint64_t *seq, uint64_t *off,
                       uint64_t *len);
uint64_t btt_mem_record_clock(void);
int btt_mem_record_data(struct btt_io *mem, size_t i, void *buf, size_t len);
void btt_mem_record_clear(struct btt_io *mem);
/* Write without recording (to assemble crash images). */
int btt_mem_poke(struct btt_io *mem, const void *buf, size_t len, uint64_t off);
/* Test hook: a sync that fails with this errno (0 = off), to model fdatasync errors. */
int btt_mem_fail_sync(struct btt_io *mem, int err);
/* Test hook: every sync sleeps this long after it is recorded, so that threads run into
 * each other's commits as they do on a disk. */
int btt_mem_set_sync_delay(struct btt_io *mem, unsigned usec);

/* ---- on-media constants (btt-format.md §1) ------------------------------------ */

#define BTT_INFO_SIZE 4096u
#define BTT_PG_SIZE 4096u
#define BTT_ARENA_MIN (1ull << 24)
#define BTT_ARENA_MAX (1ull << 39)
#define BTT_NFREE 256u
#define BTT_MAP_Z 0x80000000u
#define BTT_MAP_E 0x40000000u
#define BTT_MAP_MASK 0x3FFFFFFFu
#define BTT_MAP_NORMAL 0xC0000000u
#define BTT_LOG_GROUP 64u
#define BTT_IB_FLAG_ERROR 0x1u

/* One info block, decoded (all fields of btt-format.md §3). */
struct btt_info {
	uint8_t signature[16];
	uint8_t uuid[16];
	uint8_t parent_uuid[16];
	uint32_t flags;
	uint16_t version_major;
	uint16_t version_minor;
	uint32_t external_lbasize;
	uint32_t external_nlba;
	uint32_t internal_lbasize;
	uint32_t internal_nlba;
	uint32_t nfree;
	uint32_t infosize;
	uint64_t nextoff;
	uint64_t dataoff;
	uint64_t mapoff;
	uint64_t logoff;
	uint64_t info2off;
	uint64_t checksum;
};

uint64_t btt_fletcher64(const void *buf, size_t len);
/* Pack fills the checksum; unpack reports whether the stored checksum matches. */
void btt_info_pack(struct btt_info *info, uint8_t out[4096]);
void btt_info_unpack(const uint8_t in[4096], struct btt_info *info, int *checksum_ok);
int btt_lbasize_supported(uint32_t lbasize);
uint32_t btt_internal_lbasize(uint32_t lbasize);

/* One arena of a computed or discovered layout. Offsets relative to the arena start,
 * as on media, except `start` (byte offset from the BTT start). */
struct btt_arena_layout {
	uint64_t start;
	uint64_t size;
	uint64_t lba_start;
	uint32_t external_nlba;
	uint32_t internal_nlba;
	uint32_t internal_lbasize;
	uint32_t nfree;
	uint64_t dataoff, mapoff, logoff, info2off, nextoff;
};

/* The arena layout for a BTT of `rawsize` bytes (btt-format.md §4). Returns the number of
 * arenas (writing at most `max` of them) or -EINVAL (unsupported lbasize) / -ENXIO (too
 * small). arena_max = 0 means the kernel's 512 GiB; other values exist for tests only. */
int btt_compute_layout(uint64_t rawsize, uint32_t lbasize, uint64_t arena_max,
		       struct btt_arena_layout *out, int max);

/* ---- the engine (btt.c) ------------------------------------------------------- */

struct btt;

enum btt_durability { BTT_DUR_GROUP = 0, BTT_DUR_STRICT = 1, BTT_DUR_NONE = 2 };

struct btt_format_params {
	uint64_t ns_offset;     /* namespace start in the backing store */
	uint64_t ns_size;       /* namespace size */
	uint32_t lbasize;       /* external lbasize: 512 520 528 4096 4104 4160 4224 */
	uint16_t version_major; /* 1 (v1.1, at +4 KiB) or 2 (v2.0, at +0) */
	uint16_t version_minor;
	uint8_t uuid[16];
	uint8_t parent_uuid[16];
	uint64_t arena_max; /* 0 = 512 GiB; smaller values make test geometries (not kernel) */
};

struct btt_open_params {
	uint64_t ns_offset;
	uint64_t ns_size;
	int version;           /* 0 = autodetect (1.1 at +4 KiB, then 2.0 at +0), 11, 20 */
	int check_parent;      /* 1: a non-zero parent_uuid on media must equal parent_uuid */
	uint8_t parent_uuid[16];
	int readonly;
	int durability;        /* enum btt_durability */
	struct btt_io *journal; /* group mode: intent journal (process-crash safety); may be NULL */
	uint8_t boot_id[16];    /* journal entries from another boot are not replayed */
};

int btt_format(struct btt_io *io, const struct btt_format_params *p);
int btt_open(struct btt_io *io, const struct btt_open_params *p, struct btt **out);
/* Commits staged writes, stops the timer and frees everything; returns the commit's result. */
int btt_close(struct btt *b);
/* btt_close in two steps, for owners whose other threads may still call in: after
 * btt_shutdown every call fails with -ESHUTDOWN (calls already running finish first, and
 * the commit happens); btt_free releases the memory once nobody can call any more. */
int btt_shutdown(struct btt *b);
void btt_free(struct btt *b);

int btt_read(struct btt *b, uint64_t lba, uint64_t count, void *buf);
int btt_write(struct btt *b, uint64_t lba, uint64_t count, const void *buf, int flags);
int btt_write_zeroes(struct btt *b, uint64_t lba, uint64_t count, int flags);
/* Zero-flag extension: mark sectors as reading zeros by setting Z in their map entries. */
int btt_set_zero(struct btt *b, uint64_t lba, uint64_t count, int flags);
int btt_flush(struct btt *b);
/* Byte-addressed I/O for servers: offset and length must be whole sectors, and the length
 * at most BTT_MAX_REQUEST (the maximum block size servers advertise), else -EINVAL
 * (no read-modify-write: it would break per-sector atomicity). */
#define BTT_MAX_REQUEST 33554432u
int btt_pread(struct btt *b, void *buf, uint64_t len, uint64_t off);
int btt_pwrite(struct btt *b, const void *buf, uint64_t len, uint64_t off, int flags);
/* Block status (NBD's base:allocation): what bytes [off, off+len) read as, in at most
 * `max` extents written to out[0..*n), ascending and contiguous from `off` (the first starts
 * exactly there; the last ends at off+len or earlier when `max` ran out: a partial answer).
 * BTT_EXTENT_HOLE means every byte of the extent reads as zeros (the map's Z flag, or a
 * block that is a hole in the file); type 0 may be anything. Holes are never claimed for
 * bytes that may read otherwise, so a copy that skips them loses nothing. The time taken
 * grows with the extents found and the map pages written, not with len. */
struct btt_extent {
	uint64_t offset, length;
	uint32_t type;
};
/* NBD_STATE_HOLE | NBD_STATE_ZERO, so servers pass it through */
#define BTT_EXTENT_HOLE 3
int btt_block_status(struct btt *b, uint64_t off, uint64_t len, struct btt_extent *out,
		     uint32_t max, uint32_t *n);
/* Group mode: commit staged writes at least every interval_ms from a background thread. */
int btt_start_timer(struct btt *b, unsigned interval_ms);

#define BTT_FUA 1

uint64_t btt_nlba(struct btt *b);
uint32_t btt_sector_size(struct btt *b);
uint32_t btt_lbasize(struct btt *b);
int btt_narenas(struct btt *b);
int btt_arena_info(struct btt *b, int i, struct btt_info *info, struct btt_arena_layout *lay);
int btt_flog_scheme(struct btt *b, int arena, int *idx0, int *idx1);

struct btt_stats {
	uint64_t writes;        /* sectors written */
	uint64_t commits;
	uint64_t syncs;         /* barriers issued to the backend */
	uint64_t journal_replayed;
	uint64_t redo_applied;
	uint64_t map_reads;     /* map reads from the media (cache misses) */
	uint64_t hole_reads;    /* sectors read as zeros from a hole, unread */
	uint64_t data_reads;    /* preads of data blocks: one per span of consecutive blocks */
};
void btt_get_stats(struct btt *b, struct btt_stats *s);

/* ---- raw exports (raw.c) ------------------------------------------------------ */

/* A namespace served without a BTT: bytes [offset, offset+size) of the io, which the
 * export owns from a successful open on. Requests must be aligned to `block`; every call
 * counts itself in, so that after btt_raw_shutdown (which waits for the calls running and
 * syncs) none reaches the file; btt_raw_free releases it once nobody can call any more. */
struct btt_raw;
/* btt_raw_zero flag: keep the range allocated (NBD_CMD_FLAG_NO_HOLE); BTT_FUA as well. */
#define BTT_RAW_ALLOCATE 2
int btt_raw_open(struct btt_io *io, uint64_t offset, uint64_t size, uint32_t block,
		 int readonly, struct btt_raw **out);
uint64_t btt_raw_size(struct btt_raw *r);
int btt_raw_pread(struct btt_raw *r, void *buf, uint64_t len, uint64_t off);
int btt_raw_pwrite(struct btt_raw *r, const void *buf, uint64_t len, uint64_t off, int flags);
int btt_raw_zero(struct btt_raw *r, uint64_t len, uint64_t off, int flags);
int btt_raw_flush(struct btt_raw *r);
/* Block status as btt_block_status, from the file's holes (SEEK_DATA/SEEK_HOLE), shrunk to
 * whole blocks of the export. */
int btt_raw_block_status(struct btt_raw *r, uint64_t off, uint64_t len, struct btt_extent *out,
			 uint32_t max, uint32_t *n);
int btt_raw_shutdown(struct btt_raw *r);
void btt_raw_free(struct btt_raw *r);

/* ---- checking (check.c) ------------------------------------------------------- */

struct btt_check_result {
	uint64_t blocks;       /* internal blocks examined */
	uint64_t out_of_range; /* map or free-list entries pointing outside the data area */
	uint64_t duplicates;   /* blocks referenced more than once */
	uint64_t unreferenced; /* blocks referenced by neither map nor free list */
	uint64_t error_entries; /* map entries with only E set */
	uint64_t zero_entries;  /* map entries with only Z set */
};
/* The bitmap rule: every internal block referenced exactly once by map + free list.
 * Problems are described in msgbuf (one per line, truncated). */
int btt_check(struct btt *b, struct btt_check_result *r, char *msgbuf, size_t msglen);

/* Offline check of a BTT that may be too damaged to open (check-namespace). */
struct btt_check_opts {
	uint64_t ns_offset, ns_size;
	int version;     /* 0 = autodetect, 11, 20 */
	int repair;      /* restore info blocks from backups, redo interrupted writes */
	int rewrite_log; /* with repair: regenerate every lane's log in the (0,1) scheme */
	void (*progress)(void *ctx, int arena, uint64_t done, uint64_t total);
	void *ctx;
};
struct btt_check_summary {
	int found;          /* a BTT was located (primary or backup info block) */
	int version;        /* 11 or 20 */
	int narenas;
	uint32_t lbasize;
	uint64_t nlba;
	uint64_t errors;    /* problems found */
	uint64_t repaired;  /* of which repaired */
};
/* Findings go to `report`, one per line: severity, arena, code, repaired, text (tab-separated).
 * Returns 0 when the check ran, -ENODEV when no BTT was found, another errno on I/O errors. */
int btt_check_offline(struct btt_io *io, const struct btt_check_opts *o,
		      struct btt_check_summary *sum, char *report, size_t len);

/* ---- tests and tools ---------------------------------------------------------- */

/* Test-only switches that break the write ordering; the crash tests prove they are caught. */
enum {
	BTT_MUT_NONE = 0,
	BTT_MUT_MAP_BEFORE_FLOG = 1,
	BTT_MUT_FLOG_BEFORE_DATA_DURABLE = 2,
	BTT_MUT_REUSE_BEFORE_COMMIT = 3,
	BTT_MUT_REWRITE_DURING_COMMIT = 4, /* an LBA being committed written again at once */
	BTT_MUT_JOURNAL_RETIRED_EARLY = 5, /* the journal calls an epoch committed too soon */
	BTT_MUT_REPLAY_ONE_EPOCH = 6,      /* replay ignores the epoch filled during a commit */
	BTT_MUT_NO_RTT_WAIT = 7,           /* writers reuse blocks that readers are still copying */
	BTT_MUT_FLUSH_BEFORE_BARRIER2 = 8, /* a commit returns before its flog is durable */
};
extern int btt_test_mutation;

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

const char *btt_errmsg(void);
uint32_t btt_crc32c(uint32_t crc, const void *buf, size_t len);

#endif
