/*
 * btt.c - the BTT engine: layout, format, discovery and recovery, and the I/O path.
 *
 * On-media format: Linux drivers/nvdimm/btt.c and Documentation/driver-api/nvdimm/btt.rst,
 * summarised in docs/engine.md ("§" numbers below refer to docs/btt-format.md). Durability
 * on an ordinary file: docs/engine.md.
 *
 * How a write becomes durable here (every mode uses the same steps; they differ in when
 * a commit runs and whether barriers are real fdatasyncs):
 *
 *   reserve   take a clean lane; its free block F receives the data
 *   data      pwrite the sector into F                         (no lock held)
 *   publish   stage {lba, old, F, seq}; readers now see F; append to the intent journal
 *   commit    barrier -> flog entries -> barrier -> map entries; lanes advance to their
 *             old blocks, which only now become reusable
 *
 * Within one epoch (the writes between two commits) a lane is used at most once and an
 * LBA is staged at most once, so any subset of the flog and map writes that reach the
 * media is repaired by the kernel's own load-time recovery (§6.5). group mode commits on
 * FLUSH, FUA, a full epoch, an LBA conflict and a timer; strict and none commit at the end
 * of every write request (strict with fdatasync, none without).
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "btt_int.h"

int btt_test_mutation = BTT_MUT_NONE;

/* ---- errors ------------------------------------------------------------------- */

static __thread char errbuf[512];

int seterr(int err, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(errbuf, sizeof(errbuf), fmt, ap);
	va_end(ap);
	return -err;
}

const char *btt_errmsg(void)
{
	return errbuf;
}

/* ---- little-endian fields ----------------------------------------------------- */

static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
uint32_t get32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get64(const uint8_t *p) { return get32(p) | (uint64_t)get32(p + 4) << 32; }
static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v, p[1] = (uint8_t)(v >> 8); }
void put32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}
static void put64(uint8_t *p, uint64_t v) { put32(p, (uint32_t)v), put32(p + 4, (uint32_t)(v >> 32)); }

const uint8_t BTT_SIG[16] = "BTT_ARENA_INFO\0";

bool is_zero(const void *buf, size_t len)
{
	const uint8_t *p = buf;
	for (size_t i = 0; i < len; i++)
		if (p[i])
			return false;
	return true;
}

/* ---- info block (§3) ----------------------------------------------------------- */

uint64_t btt_fletcher64(const void *buf, size_t len)
{
	const uint8_t *p = buf;
	uint32_t lo = 0, hi = 0;

	for (size_t i = 0; i + 4 <= len; i += 4) {
		lo += get32(p + i);
		hi += lo;
	}
	return (uint64_t)hi << 32 | lo;
}

void btt_info_pack(struct btt_info *ib, uint8_t out[4096])
{
	memset(out, 0, BTT_INFO_SIZE);
	memcpy(out + 0x00, ib->signature, 16);
	memcpy(out + 0x10, ib->uuid, 16);
	memcpy(out + 0x20, ib->parent_uuid, 16);
	put32(out + 0x30, ib->flags);
	put16(out + 0x34, ib->version_major);
	put16(out + 0x36, ib->version_minor);
	put32(out + 0x38, ib->external_lbasize);
	put32(out + 0x3C, ib->external_nlba);
	put32(out + 0x40, ib->internal_lbasize);
	put32(out + 0x44, ib->internal_nlba);
	put32(out + 0x48, ib->nfree);
	put32(out + 0x4C, ib->infosize);
	put64(out + 0x50, ib->nextoff);
	put64(out + 0x58, ib->dataoff);
	put64(out + 0x60, ib->mapoff);
	put64(out + 0x68, ib->logoff);
	put64(out + 0x70, ib->info2off);
	ib->checksum = btt_fletcher64(out, BTT_INFO_SIZE);
	put64(out + 0xFF8, ib->checksum);
}

void btt_info_unpack(const uint8_t in[4096], struct btt_info *ib, int *checksum_ok)
{
	uint8_t copy[BTT_INFO_SIZE];

	memcpy(ib->signature, in + 0x00, 16);
	memcpy(ib->uuid, in + 0x10, 16);
	memcpy(ib->parent_uuid, in + 0x20, 16);
	ib->flags = get32(in + 0x30);
	ib->version_major = get16(in + 0x34);
	ib->version_minor = get16(in + 0x36);
	ib->external_lbasize = get32(in + 0x38);
	ib->external_nlba = get32(in + 0x3C);
	ib->internal_lbasize = get32(in + 0x40);
	ib->internal_nlba = get32(in + 0x44);
	ib->nfree = get32(in + 0x48);
	ib->infosize = get32(in + 0x4C);
	ib->nextoff = get64(in + 0x50);
	ib->dataoff = get64(in + 0x58);
	ib->mapoff = get64(in + 0x60);
	ib->logoff = get64(in + 0x68);
	ib->info2off = get64(in + 0x70);
	ib->checksum = get64(in + 0xFF8);
	if (checksum_ok) {
		memcpy(copy, in, BTT_INFO_SIZE);
		memset(copy + 0xFF8, 0, 8);
		*checksum_ok = btt_fletcher64(copy, BTT_INFO_SIZE) == ib->checksum;
	}
}

int btt_lbasize_supported(uint32_t lbasize)
{
	static const uint32_t ok[] = {512, 520, 528, 4096, 4104, 4160, 4224};
	for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++)
		if (ok[i] == lbasize)
			return 1;
	return 0;
}

uint32_t btt_internal_lbasize(uint32_t lbasize)
{
	return (lbasize + 63u) & ~63u; /* the kernel's INT_LBASIZE_ALIGNMENT */
}

/* Bytes per LBA that reach the user: the Linux logical block size. The rest of an
 * external block (520 - 512, ...) is integrity metadata NBD has no channel for. */
static uint32_t data_bytes(uint32_t lbasize)
{
	return lbasize >= 4096 ? 4096 : 512;
}

/* ---- layout (§4) -------------------------------------------------------------- */

int btt_compute_layout(uint64_t rawsize, uint32_t lbasize, uint64_t arena_max,
		       struct btt_arena_layout *out, int max)
{
	const uint64_t logsize = ((uint64_t)BTT_NFREE * BTT_LOG_GROUP + BTT_PG_SIZE - 1) &
				 ~(uint64_t)(BTT_PG_SIZE - 1);
	uint64_t remaining = rawsize, off = 0, lba = 0;
	uint32_t ilbs;
	int n = 0;

	if (!btt_lbasize_supported(lbasize))
		return seterr(EINVAL, "sector size %u is not one of 512 520 528 4096 4104 4160 4224",
			      lbasize);
	if (arena_max == 0)
		arena_max = BTT_ARENA_MAX;
	if (arena_max < BTT_ARENA_MIN || arena_max > BTT_ARENA_MAX || arena_max % BTT_PG_SIZE)
		return seterr(EINVAL, "arena size limit %llu is out of range",
			      (unsigned long long)arena_max);
	if (rawsize < BTT_ARENA_MIN)
		return seterr(ENXIO, "BTT raw size %llu is below the 16 MiB minimum",
			      (unsigned long long)rawsize);
	ilbs = btt_internal_lbasize(lbasize);
	while (remaining > 0) {
		uint64_t s = remaining < arena_max ? remaining : arena_max;
		uint64_t avail, internal, mapsize;
		struct btt_arena_layout l;

		remaining -= s;
		if (s < BTT_ARENA_MIN)
			break; /* a tail under 16 MiB is left unused, as the kernel does */
		avail = (s & ~(uint64_t)(BTT_PG_SIZE - 1)) - 2 * BTT_INFO_SIZE - logsize;
		internal = (avail - BTT_PG_SIZE) / (ilbs + 4);
		mapsize = (4 * (internal - BTT_NFREE) + BTT_PG_SIZE - 1) & ~(uint64_t)(BTT_PG_SIZE - 1);
		l.start = off;
		l.size = s;
		l.lba_start = lba;
		l.internal_nlba = (uint32_t)internal;
		l.external_nlba = (uint32_t)(internal - BTT_NFREE);
		l.internal_lbasize = ilbs;
		l.nfree = BTT_NFREE;
		l.dataoff = BTT_INFO_SIZE;
		l.mapoff = BTT_INFO_SIZE + avail - mapsize;
		l.logoff = BTT_INFO_SIZE + avail;
		l.info2off = l.logoff + logsize;
		l.nextoff = remaining >= BTT_ARENA_MIN ? s : 0;
		if (n < max)
			out[n] = l;
		n++;
		off += s;
		lba += l.external_nlba;
	}
	return n;
}

/* ---- format (§4, §6.2) -------------------------------------------------------- */

static void initial_flog(uint8_t *flog, const struct btt_arena_layout *l)
{
	memset(flog, 0, (size_t)(l->info2off - l->logoff));
	for (uint32_t i = 0; i < l->nfree; i++) {
		uint8_t *slot0 = flog + (size_t)i * BTT_LOG_GROUP;
		put32(slot0 + 0, i);
		put32(slot0 + 4, l->external_nlba + i);
		put32(slot0 + 8, l->external_nlba + i);
		put32(slot0 + 12, 1);
	}
}

static void info_from_layout(struct btt_info *ib, const struct btt_format_params *p,
			     const struct btt_arena_layout *l)
{
	memset(ib, 0, sizeof(*ib));
	memcpy(ib->signature, BTT_SIG, 16);
	memcpy(ib->uuid, p->uuid, 16);
	memcpy(ib->parent_uuid, p->parent_uuid, 16);
	ib->version_major = p->version_major;
	ib->version_minor = p->version_minor;
	ib->external_lbasize = p->lbasize;
	ib->external_nlba = l->external_nlba;
	ib->internal_lbasize = l->internal_lbasize;
	ib->internal_nlba = l->internal_nlba;
	ib->nfree = l->nfree;
	ib->infosize = BTT_INFO_SIZE;
	ib->nextoff = l->nextoff;
	ib->dataoff = l->dataoff;
	ib->mapoff = l->mapoff;
	ib->logoff = l->logoff;
	ib->info2off = l->info2off;
}

int btt_format(struct btt_io *io, const struct btt_format_params *p)
{
	static const uint8_t zeros[BTT_PG_SIZE];
	uint64_t initial, base, rawsize;
	struct btt_arena_layout *lay = NULL;
	uint8_t block[BTT_INFO_SIZE], *flog = NULL;
	int n, rc;

	if (!((p->version_major == 1 && p->version_minor == 1) ||
	      (p->version_major == 2 && p->version_minor == 0)))
		return seterr(EINVAL, "BTT version %u.%u is not 1.1 or 2.0", p->version_major,
			      p->version_minor);
	initial = p->version_major == 1 ? BTT_PG_SIZE : 0;
	if (p->ns_size < initial + BTT_ARENA_MIN)
		return seterr(ENXIO, "namespace of %llu bytes is too small for a BTT %u.%u (needs %llu)",
			      (unsigned long long)p->ns_size, p->version_major, p->version_minor,
			      (unsigned long long)(initial + BTT_ARENA_MIN));
	if (p->ns_offset + p->ns_size < p->ns_offset ||
	    btt_io_size(io) < p->ns_offset + p->ns_size)
		return seterr(EINVAL, "namespace [%llu, +%llu) lies beyond the end of the backing store",
			      (unsigned long long)p->ns_offset, (unsigned long long)p->ns_size);
	rawsize = p->ns_size - initial;
	base = p->ns_offset + initial;
	n = btt_compute_layout(rawsize, p->lbasize, p->arena_max, NULL, 0);
	if (n < 0)
		return n;
	lay = calloc((size_t)n, sizeof(*lay));
	flog = malloc(BTT_NFREE * BTT_LOG_GROUP * 2);
	if (!lay || !flog) {
		rc = seterr(ENOMEM, "out of memory");
		goto out;
	}
	btt_compute_layout(rawsize, p->lbasize, p->arena_max, lay, n);

	/* The page where the other BTT version would keep its info block is cleared, so a
	 * stale BTT of the other version can never be autodetected in place of this one. */
	rc = io->ops->write(io, zeros, sizeof(zeros), p->ns_offset + (initial ? 0 : BTT_PG_SIZE));
	/* Map zeroed (every entry identity) and flog initialised in every arena, then the
	 * info blocks: backups, later arenas, and arena 0's primary last, so a crash during
	 * format leaves either no BTT or a complete one. */
	for (int i = 0; i < n && !rc; i++) {
		const struct btt_arena_layout *l = &lay[i];
		uint64_t a = base + l->start;
		rc = io->ops->zero(io, a + l->mapoff, l->logoff - l->mapoff);
		if (!rc) {
			initial_flog(flog, l);
			rc = io->ops->write(io, flog, (size_t)(l->info2off - l->logoff), a + l->logoff);
		}
	}
	if (!rc)
		rc = io->ops->sync(io);
	for (int i = n - 1; i >= 0 && !rc; i--) {
		struct btt_info ib;
		info_from_layout(&ib, p, &lay[i]);
		btt_info_pack(&ib, block);
		rc = io->ops->write(io, block, sizeof(block), base + lay[i].start + lay[i].info2off);
		if (!rc && i > 0)
			rc = io->ops->write(io, block, sizeof(block), base + lay[i].start);
	}
	if (!rc)
		rc = io->ops->sync(io);
	if (!rc) {
		struct btt_info ib;
		info_from_layout(&ib, p, &lay[0]);
		btt_info_pack(&ib, block);
		rc = io->ops->write(io, block, sizeof(block), base);
	}
	if (!rc)
		rc = io->ops->sync(io);
out:
	free(lay);
	free(flog);
	return rc;
}

/* ---- discovery: validating untrusted info blocks (§3, §4) ---------------------- */

/* Checks one arena's info block against everything the engine will index with it.
 * `start` is the arena's offset from the BTT start, `rawsize` the BTT's size. */
int validate_arena(const struct btt_info *ib, int idx, uint64_t start, uint64_t rawsize,
		   const struct btt_info *first, struct btt_arena_layout *l)
{
	uint64_t size, room = rawsize - start;

#define BAD(...) seterr(EUCLEAN, __VA_ARGS__)
	if (!btt_lbasize_supported(ib->external_lbasize))
		return BAD("arena %d: external_lbasize %u is not a BTT sector size", idx,
			   ib->external_lbasize);
	if (first && ib->external_lbasize != first->external_lbasize)
		return BAD("arena %d: external_lbasize %u differs from arena 0's %u", idx,
			   ib->external_lbasize, first->external_lbasize);
	if (ib->internal_lbasize < ib->external_lbasize || ib->internal_lbasize > 65536)
		return BAD("arena %d: internal_lbasize %u is not between external_lbasize %u and 65536",
			   idx, ib->internal_lbasize, ib->external_lbasize);
	if (ib->nfree == 0 || ib->nfree > BTT_NFREE)
		return BAD("arena %d: nfree %u is not between 1 and %u", idx, ib->nfree, BTT_NFREE);
	if (ib->internal_nlba > BTT_MAP_MASK + 1u || ib->internal_nlba <= ib->nfree)
		return BAD("arena %d: internal_nlba %u is not between nfree+1 and 2^30", idx,
			   ib->internal_nlba);
	if (ib->external_nlba != ib->internal_nlba - ib->nfree)
		return BAD("arena %d: external_nlba %u != internal_nlba %u - nfree %u", idx,
			   ib->external_nlba, ib->internal_nlba, ib->nfree);
	if ((ib->dataoff | ib->mapoff | ib->logoff | ib->info2off | ib->nextoff) % BTT_PG_SIZE)
		return BAD("arena %d: an offset is not a multiple of 4096", idx);
	size = ib->nextoff ? ib->nextoff : ib->info2off + BTT_INFO_SIZE;
	if (ib->info2off > room || size > room || size < BTT_ARENA_MIN)
		return BAD("arena %d at BTT offset %llu: size %llu (nextoff %llu, info2off %llu) does "
			   "not fit the %llu bytes left or is below 16 MiB", idx,
			   (unsigned long long)start, (unsigned long long)size,
			   (unsigned long long)ib->nextoff, (unsigned long long)ib->info2off,
			   (unsigned long long)room);
	/* Each offset inside the arena first, so the sums below cannot wrap around. */
	if (ib->dataoff >= size || ib->mapoff >= size || ib->logoff >= size || ib->info2off >= size)
		return BAD("arena %d: an offset (dataoff %llu, mapoff %llu, logoff %llu, info2off %llu) "
			   "lies beyond the arena's %llu bytes", idx, (unsigned long long)ib->dataoff,
			   (unsigned long long)ib->mapoff, (unsigned long long)ib->logoff,
			   (unsigned long long)ib->info2off, (unsigned long long)size);
	if (ib->dataoff < BTT_INFO_SIZE ||
	    ib->dataoff + (uint64_t)ib->internal_nlba * ib->internal_lbasize > ib->mapoff ||
	    ib->mapoff + (uint64_t)ib->external_nlba * 4 > ib->logoff ||
	    ib->logoff + (uint64_t)ib->nfree * BTT_LOG_GROUP > ib->info2off ||
	    ib->info2off + BTT_INFO_SIZE > size)
		return BAD("arena %d: data/map/flog/info2 areas (dataoff %llu, mapoff %llu, logoff %llu, "
			   "info2off %llu) overlap or are out of order", idx,
			   (unsigned long long)ib->dataoff, (unsigned long long)ib->mapoff,
			   (unsigned long long)ib->logoff, (unsigned long long)ib->info2off);
#undef BAD
	l->start = start;
	l->size = size;
	l->external_nlba = ib->external_nlba;
	l->internal_nlba = ib->internal_nlba;
	l->internal_lbasize = ib->internal_lbasize;
	l->nfree = ib->nfree;
	l->dataoff = ib->dataoff;
	l->mapoff = ib->mapoff;
	l->logoff = ib->logoff;
	l->info2off = ib->info2off;
	l->nextoff = ib->nextoff;
	return 0;
}

/* Reads and authenticates an info block: signature, checksum, parent uuid. */
int read_info(struct btt_io *io, uint64_t off, const struct btt_open_params *p, struct btt_info *ib)
{
	uint8_t block[BTT_INFO_SIZE];
	int ok, rc = io->ops->read(io, block, sizeof(block), off);
	static const uint8_t null_uuid[16];

	if (rc)
		return rc;
	btt_info_unpack(block, ib, &ok);
	if (memcmp(ib->signature, BTT_SIG, 16))
		return seterr(ENODEV, "no BTT signature at offset %llu", (unsigned long long)off);
	if (!ok)
		return seterr(ENODEV, "info block at offset %llu has a bad checksum",
			      (unsigned long long)off);
	if (p->check_parent && memcmp(ib->parent_uuid, null_uuid, 16) &&
	    memcmp(ib->parent_uuid, p->parent_uuid, 16))
		return seterr(ENODEV, "info block at offset %llu belongs to another namespace "
			      "(parent_uuid mismatch)", (unsigned long long)off);
	return 0;
}

/* ---- flog (§6) ---------------------------------------------------------------- */

const uint32_t seq_next[4] = {0, 2, 3, 1};

void flog_slot_get(const uint8_t *group, int slot, struct flog_entry *e)
{
	const uint8_t *s = group + slot * 16;
	e->lba = get32(s), e->old_map = get32(s + 4), e->new_map = get32(s + 8), e->seq = get32(s + 12);
}

void flog_slot_put(uint8_t *group, int slot, const struct flog_entry *e)
{
	uint8_t *s = group + slot * 16;
	put32(s, e->lba), put32(s + 4, e->old_map), put32(s + 8, e->new_map), put32(s + 12, e->seq);
}

/* Which two of a lane's four slots are live: (0,1) since Linux 4.15, (0,2) before (§6.3). */
int flog_detect_scheme(const uint8_t *flog, uint32_t nfree, int aidx, int idx[2])
{
	unsigned used = 0;

	for (uint32_t i = 0; i < nfree; i++) {
		unsigned mask = 0;
		for (int s = 0; s < 4; s++)
			if (!is_zero(flog + (size_t)i * BTT_LOG_GROUP + s * 16, 16))
				mask |= 1u << s;
		if (!(mask & 1))
			return seterr(EUCLEAN, "arena %d lane %u: flog slot 0 is empty (never initialised)",
				      aidx, i);
		used |= mask;
	}
	idx[0] = 0;
	if (used == 0x1 || used == 0x3)
		idx[1] = 1;
	else if (used == 0x5)
		idx[1] = 2;
	else
		return seterr(EUCLEAN, "arena %d: unknown flog padding scheme (live slots mask 0x%x)",
			      aidx, used);
	return 0;
}

/* The newer of a lane's two live entries (§6.4); -1 when their sequence numbers conflict. */
int flog_newest(const struct flog_entry *e0, const struct flog_entry *e1)
{
	uint32_t a = e0->seq, b = e1->seq;

	if (a > 3 || b > 3 || a == b)
		return -1;
	if (a == 0)
		return 1;
	if (b == 0)
		return 0;
	return seq_next[a] == b ? 1 : 0;
}

/* ---- the map (§5) and its cache ------------------------------------------------------ */

/*
 * Every request touches the map: a read resolves its LBA, a write learns the block it
 * frees. A 4-byte pread per sector was the one syscall a BTT read paid on top of a plain
 * file server's, so each arena keeps whole 4 KiB map pages in a small direct-mapped cache.
 * A slot keeps the first page it receives (see map_cached_locked); entries of a page whose
 * slot holds another are read and written on the media directly, under that slot's lock.
 *
 * The cache is write-through and exact: a page is filled by one pread under its slot lock,
 * and every map write goes to the backend and then into the cached page under the same
 * lock, so a fill can never install a page older than a write that completed before it.
 * An open engine is the only writer of its map (servers lock the region file). A failed
 * write drops the page, since what reached the media is then unknown. The cached words
 * are the raw on-media entries: every use still validates them.
 */
#define MAP_PAGE_WORDS (BTT_PG_SIZE / 4)
#define MAP_CACHE_MAX 1024u /* pages per arena (4 MiB): a 1 GiB namespace's whole map is 256 */

static uint64_t map_off(const struct arena *a, uint32_t premap)
{
	return a->base + a->lay.mapoff + (uint64_t)premap * 4;
}

static uint64_t block_off(const struct arena *a, uint32_t block)
{
	return a->base + a->lay.dataoff + (uint64_t)block * a->lay.internal_lbasize;
}

static int map_cache_init(struct arena *a)
{
	uint32_t pages = (a->lay.external_nlba + MAP_PAGE_WORDS - 1) / MAP_PAGE_WORDS;

	a->mc_slots = 1;
	while (a->mc_slots < pages && a->mc_slots < MAP_CACHE_MAX)
		a->mc_slots *= 2;
	a->mcache = calloc(a->mc_slots, sizeof(*a->mcache));
	if (!a->mcache)
		return seterr(ENOMEM, "out of memory");
	for (uint32_t i = 0; i < a->mc_slots; i++)
		pthread_mutex_init(&a->mcache[i].lock, NULL);
	return 0;
}

static void map_cache_free(struct arena *a)
{
	for (uint32_t i = 0; a->mcache && i < a->mc_slots; i++) {
		pthread_mutex_destroy(&a->mcache[i].lock);
		free(a->mcache[i].words);
	}
	free(a->mcache);
	free((void *)a->map_hole);
	free((void *)a->data_hole);
}

/* ---- holes in the file ----------------------------------------------------------------
 *
 * Map pages and data blocks that are holes in the file read as zeros, and on a sparse
 * namespace most of them are: a fresh BTT's map is one big hole (identity entries), and
 * an LBA never written maps to a data block never written. Reading a hole is not free —
 * the kernel zero-fills page-cache pages for it, and its readahead fills up to 128 KiB
 * more — so that a 4k random read of a fresh 1 TiB namespace cost a quarter of the CPU in
 * memset. The holes are found once, at open, by walking the file's data extents (at most
 * HOLE_EXTENTS_MAX per area; past them everything counts as data). A bit set means "this
 * unit was a hole at open and nothing has been written to it since": bits are only ever
 * cleared, before the write that ends the hole is issued, so a reader that finds one set
 * may return zeros without reading. */
#define HOLE_EXTENTS_MAX 65536u
#define DATA_HOLE_UNIT (64u << 10) /* bytes of the data area per bit: 1 MiB of bits per 512 GiB */

/* Bitmap of the `units` units of `unit` bytes from `start` that lie wholly in holes. */
static int holes_find(struct btt_io *io, uint64_t start, uint64_t unit, uint64_t units,
		      _Atomic uint64_t **bits_out)
{
	uint64_t end = start + units * unit, off = start;
	_Atomic uint64_t *bits = calloc((units + 63) / 64, sizeof(*bits));

	if (!bits)
		return seterr(ENOMEM, "out of memory");
	for (uint32_t n = 0; off < end && n < HOLE_EXTENTS_MAX; n++) {
		uint64_t data = io->ops->next_data(io, off), stop = data < end ? data : end;
		for (uint64_t u = (off - start + unit - 1) / unit; u < (stop - start) / unit; u++)
			bits[u / 64] |= 1ull << (u % 64); /* the units wholly inside [off, data) */
		if (data >= end)
			break;
		off = io->ops->next_hole(io, data);
	}
	*bits_out = bits;
	return 0;
}

static bool hole_bit(_Atomic uint64_t *bits, uint64_t u)
{
	return atomic_load_explicit(&bits[u / 64], memory_order_relaxed) >> (u % 64) & 1;
}

static void hole_ends(_Atomic uint64_t *bits, uint64_t u)
{
	if (hole_bit(bits, u))
		atomic_fetch_and(&bits[u / 64], ~(1ull << (u % 64)));
}

/* Units wholly inside the data area: a last partial one counts as data, and has no bit. */
static uint64_t data_hole_units(const struct arena *a)
{
	return (uint64_t)a->lay.internal_nlba * a->lay.internal_lbasize / DATA_HOLE_UNIT;
}

static int holes_init(struct btt *b, struct arena *a)
{
	uint32_t map_pages = (a->lay.external_nlba + MAP_PAGE_WORDS - 1) / MAP_PAGE_WORDS;
	int rc = holes_find(b->io, map_off(a, 0), BTT_PG_SIZE, map_pages, &a->map_hole);

	if (!rc)
		rc = holes_find(b->io, block_off(a, 0), DATA_HOLE_UNIT, data_hole_units(a),
				&a->data_hole);
	return rc;
}

static bool map_page_is_hole(struct arena *a, uint32_t page)
{
	return hole_bit(a->map_hole, page);
}

/* Before page `page` is written (its slot lock held). */
static void map_page_written(struct arena *a, uint32_t page)
{
	hole_ends(a->map_hole, page);
}

/* The data units a block spans (two when its size does not divide the unit). */
static void block_units(const struct arena *a, uint32_t block, uint64_t *first, uint64_t *last)
{
	uint64_t off = (uint64_t)block * a->lay.internal_lbasize;

	*first = off / DATA_HOLE_UNIT;
	*last = (off + a->lay.internal_lbasize - 1) / DATA_HOLE_UNIT;
}

static bool block_is_hole(const struct arena *a, uint32_t block)
{
	uint64_t first, last;

	block_units(a, block, &first, &last);
	return last < data_hole_units(a) && hole_bit(a->data_hole, first) &&
	       hole_bit(a->data_hole, last);
}

/* Before any write to data block `block` is issued. A reader that resolved a block in the
 * same unit may still find the bit set: its own block was not written, so zeros are right;
 * a reader of this block resolves it through the map, after the write. */
static void block_written(struct arena *a, uint32_t block)
{
	uint64_t first, last;

	block_units(a, block, &first, &last);
	for (uint64_t u = first; u <= last && u < data_hole_units(a); u++)
		hole_ends(a->data_hole, u);
}

static struct map_page *map_slot(struct arena *a, uint32_t page)
{
	return &a->mcache[page & (a->mc_slots - 1)];
}

/* With slot s locked: whether it holds map page `page`, which it then does exactly as
 * on the media. An empty slot is filled (one read, straight into the slot); a slot that
 * holds another page keeps it. Evicting on every miss cost more than it saved once the
 * map outgrows the cache (a 1 TiB namespace has 262,144 map pages per 1,024 slots, and
 * its random reads through NBD fell from 0.96-1.10x to 0.72-0.87x the 1 GiB figure),
 * while the pages first touched are all that a namespace up to 4 GiB (4k sectors) has. */
static int map_cached_locked(struct btt *b, struct arena *a, struct map_page *s, uint32_t page,
			     bool *hit)
{
	uint32_t first = page * MAP_PAGE_WORDS, left = a->lay.external_nlba - first;
	uint32_t n = left < MAP_PAGE_WORDS ? left : MAP_PAGE_WORDS;
	int rc;

	*hit = s->held && s->page == page;
	if (s->held)
		return 0;
	if (!s->words && !(s->words = malloc(BTT_PG_SIZE)))
		return seterr(ENOMEM, "out of memory");
	if (map_page_is_hole(a, page)) {
		memset(s->words, 0, (size_t)n * 4);
	} else {
		STAT_ADD(b, map_reads, 1);
		rc = b->io->ops->read(b->io, s->words, (size_t)n * 4, map_off(a, first));
		if (rc)
			return rc;
	}
	for (uint32_t i = 0; i < n; i++)
		s->words[i] = le32toh(s->words[i]); /* nothing on little-endian hosts */
	s->page = page;
	s->held = *hit = true;
	return 0;
}

/* Map entries [premap, premap+n) of arena a, from the cache or else from the media (under
 * the slot lock all the same, which orders the read against writes of the page). */
static int map_get(struct btt *b, struct arena *a, uint32_t premap, uint32_t n, uint32_t *out)
{
	while (n) {
		uint32_t page = premap / MAP_PAGE_WORDS, in = premap % MAP_PAGE_WORDS;
		uint32_t k = n < MAP_PAGE_WORDS - in ? n : MAP_PAGE_WORDS - in;
		struct map_page *s = map_slot(a, page);
		bool hit;
		int rc;

		pthread_mutex_lock(&s->lock);
		rc = map_cached_locked(b, a, s, page, &hit);
		if (!rc && hit) {
			memcpy(out, s->words + in, (size_t)k * 4);
		} else if (!rc && map_page_is_hole(a, page)) {
			memset(out, 0, (size_t)k * 4);
		} else if (!rc) {
			STAT_ADD(b, map_reads, 1);
			rc = b->io->ops->read(b->io, out, (size_t)k * 4, map_off(a, premap));
		}
		pthread_mutex_unlock(&s->lock);
		if (rc)
			return rc;
		for (uint32_t i = 0; !hit && i < k; i++)
			out[i] = le32toh(out[i]);
		premap += k, n -= k, out += k;
	}
	return 0;
}

/* Writes map entries [premap, premap+n) through the cache: one backend write per page. */
static int map_put(struct btt *b, struct arena *a, uint32_t premap, uint32_t n, const uint32_t *words)
{
	uint8_t raw[BTT_PG_SIZE];

	while (n) {
		uint32_t page = premap / MAP_PAGE_WORDS, in = premap % MAP_PAGE_WORDS;
		uint32_t k = n < MAP_PAGE_WORDS - in ? n : MAP_PAGE_WORDS - in;
		struct map_page *s = map_slot(a, page);
		int rc;

		for (uint32_t i = 0; i < k; i++)
			put32(raw + 4 * i, words[i]);
		pthread_mutex_lock(&s->lock);
		map_page_written(a, page);
		rc = b->io->ops->write(b->io, raw, (size_t)k * 4, map_off(a, premap));
		if (rc)
			s->held = false;
		else if (s->held && s->page == page)
			memcpy(s->words + in, words, (size_t)k * 4);
		pthread_mutex_unlock(&s->lock);
		if (rc)
			return rc;
		premap += k, n -= k, words += k;
	}
	return 0;
}

int arena_map_read(struct btt *b, struct arena *a, uint32_t premap, uint32_t *entry)
{
	return map_get(b, a, premap, 1, entry);
}

static int arena_map_write(struct btt *b, struct arena *a, uint32_t premap, uint32_t entry)
{
	return map_put(b, a, premap, 1, &entry);
}

static pthread_mutex_t *stripe_of(struct arena *a, uint32_t premap)
{
	return &a->stripes[(premap >> 4) % NSTRIPES];
}

/* ---- staged map words: an open-addressed table per arena ---------------------------- */

#define STAGE_EMPTY 0ull
#define STAGE_TOMB 0xFFFFFFFFull
#define STAGE_RESERVED 0x80000000ull /* in the key: data still being written */

static uint32_t stage_hash(uint32_t premap)
{
	return (premap * 0x9E3779B1u) >> 22; /* 10 bits: STAGE_SLOTS */
}

static int stage_find(struct arena *a, int t, uint32_t premap)
{
	uint64_t key = (uint64_t)premap + 1;

	for (uint32_t i = 0, h = stage_hash(premap); i < STAGE_SLOTS; i++) {
		uint64_t v = atomic_load(&a->stage[t][(h + i) % STAGE_SLOTS]);
		uint64_t k = v >> 32;
		if (v == STAGE_EMPTY)
			return -1;
		if ((k & ~STAGE_RESERVED) == key && k != STAGE_TOMB)
			return (int)((h + i) % STAGE_SLOTS);
	}
	return -1;
}

/* A visible staged map word for premap, if any, from either epoch's table (an LBA is
 * staged in at most one). Caller holds premap's stripe. */
int staged_lookup(struct arena *a, uint32_t premap, uint32_t *word)
{
	for (int t = 0; t < 2; t++) {
		int i;
		uint64_t v;

		if (atomic_load(&a->nvisible[t]) == 0 || (i = stage_find(a, t, premap)) < 0)
			continue;
		v = atomic_load(&a->stage[t][i]);
		if ((v >> 32) & STAGE_RESERVED)
			return 0;
		*word = (uint32_t)v;
		return 1;
	}
	return 0;
}

static void stage_insert(struct arena *a, int t, uint32_t premap, uint64_t keyflags, uint32_t word)
{
	uint64_t v = ((uint64_t)premap + 1 + keyflags) << 32 | word;

	/* Never full: at most 2 x nfree live entries (staged + read-only redo) in 1024 slots. */
	for (uint32_t i = 0, h = stage_hash(premap); i < STAGE_SLOTS; i++) {
		_Atomic uint64_t *slot = &a->stage[t][(h + i) % STAGE_SLOTS];
		uint64_t cur = atomic_load(slot);
		if (cur == STAGE_EMPTY || cur >> 32 == STAGE_TOMB) {
			atomic_store(slot, v);
			if (a->nstage_used[t] < STAGE_SLOTS)
				a->stage_used[t][a->nstage_used[t]++] = (uint16_t)((h + i) % STAGE_SLOTS);
			else
				a->nstage_used[t] = STAGE_SLOTS + 1;
			return;
		}
	}
}

static void stage_set(struct arena *a, int t, int i, uint32_t premap, uint64_t keyflags,
		      uint32_t word)
{
	atomic_store(&a->stage[t][i], ((uint64_t)premap + 1 + keyflags) << 32 | word);
}

/* Empties a table after its epoch's commit. Only the slots taken since the last reset are
 * cleared: a commit per write (strict, none) spent a tenth of its CPU time clearing all
 * 1024 when one was used. */
static void stage_reset(struct arena *a, int t)
{
	if (a->nstage_used[t] > STAGE_SLOTS)
		for (uint32_t i = 0; i < STAGE_SLOTS; i++)
			atomic_store_explicit(&a->stage[t][i], STAGE_EMPTY, memory_order_relaxed);
	else
		for (uint32_t i = 0; i < a->nstage_used[t]; i++)
			atomic_store_explicit(&a->stage[t][a->stage_used[t][i]], STAGE_EMPTY,
					      memory_order_relaxed);
	a->nstage_used[t] = 0;
	atomic_store(&a->nvisible[t], 0);
}

/* ---- read tracking table (§7.1) -------------------------------------------------- */

#define RTT_PENDING RTT_TAKEN /* a slot taken before any block is published in it */

static uint64_t rtt_range(uint32_t first, uint32_t count)
{
	return RTT_TAKEN | (uint64_t)count << 32 | first;
}

static __thread uint32_t rtt_hint;

/* Takes a free slot if there is one. */
static bool rtt_try_acquire(struct arena *a, uint32_t *slot)
{
	uint32_t n = a->lay.nfree;

	for (uint32_t k = 0; k < n; k++) {
		uint32_t i = (rtt_hint + k) % n;
		uint64_t zero = 0;
		if (atomic_compare_exchange_strong(&a->rtt[i], &zero, RTT_PENDING)) {
			rtt_hint = i;
			*slot = i;
			return true;
		}
	}
	return false;
}

/* Waits for a free slot: readers holding one finish without needing another. */
static uint32_t rtt_acquire(struct arena *a)
{
	uint32_t slot;

	while (!rtt_try_acquire(a, &slot))
		sched_yield();
	return slot;
}

static bool rtt_covers(uint64_t slot, uint32_t block)
{
	uint32_t first = (uint32_t)slot, count = (uint32_t)(slot >> 32) & 0x7fffffffu;

	return (slot & RTT_TAKEN) && block - first < count; /* unsigned: block >= first */
}

/* A writer about to fill free block `block` waits for readers still copying it. With no
 * reader inside read_run none can be: a reader that starts now resolves its LBA after the
 * commit that freed the block, so never to it. */
static void rtt_wait(struct arena *a, uint32_t block)
{
	if (atomic_load(&a->readers) == 0 || btt_test_mutation == BTT_MUT_NO_RTT_WAIT)
		return;
	for (uint32_t i = 0; i < a->lay.nfree; i++)
		while (rtt_covers(atomic_load(&a->rtt[i]), block))
			sched_yield();
}

/* ---- open: discovery and recovery (§4, §6.5) -------------------------------------- */

static int barrier(struct btt *b)
{
	if (b->durability == BTT_DUR_NONE)
		return 0;
	STAT_ADD(b, syncs, 1);
	return b->io->ops->sync(b->io);
}

/* Rebuilds one lane from its flog group: the free block is the newest entry's old block. */
static int lane_load(struct btt *b, struct arena *a, int aidx, uint32_t i)
{
	const uint8_t *group = a->flog_shadow + (size_t)i * BTT_LOG_GROUP;
	struct flog_entry e[2], *n;
	struct lane *ln = &a->lanes[i];
	uint32_t old, new, entry;
	int newest, rc;

	flog_slot_get(group, a->log_index[0], &e[0]);
	flog_slot_get(group, a->log_index[1], &e[1]);
	newest = flog_newest(&e[0], &e[1]);
	if (newest < 0)
		return seterr(EUCLEAN, "arena %d lane %u: flog sequence numbers %u and %u conflict",
			      aidx, i, e[0].seq, e[1].seq);
	n = &e[newest];
	old = n->old_map & BTT_MAP_MASK; /* Z/E bits masked: PMDK stores them (§6.5) */
	new = n->new_map & BTT_MAP_MASK;
	if (n->lba >= a->lay.external_nlba || old >= a->lay.internal_nlba ||
	    new >= a->lay.internal_nlba)
		return seterr(EUCLEAN, "arena %d lane %u: flog entry {lba %u, old %u, new %u} points "
			      "outside the arena (%u LBAs, %u blocks)", aidx, i, n->lba, old, new,
			      a->lay.external_nlba, a->lay.internal_nlba);
	ln->block = old;
	ln->seq = seq_next[n->seq];
	ln->sub = (uint8_t)(newest ^ 1);
	ln->state = LANE_CLEAN;
	if (old == new)
		return 0;
	/* Interrupted write: flog committed, map not yet updated -> redo the map write. */
	rc = arena_map_read(b, a, n->lba, &entry);
	if (rc)
		return rc;
	if (map_resolve(entry, n->lba) == old) {
		STAT_ADD(b, redo_applied, 1);
		if (b->readonly) {
			stage_insert(a, b->cur, n->lba, 0, BTT_MAP_NORMAL | new);
			atomic_fetch_add(&a->nvisible[b->cur], 1);
		} else {
			rc = arena_map_write(b, a, n->lba, BTT_MAP_NORMAL | new);
		}
	}
	return rc;
}

static int lanes_check_unique(struct arena *a, int aidx)
{
	uint32_t n = a->lay.nfree;

	for (uint32_t i = 0; i < n; i++)
		for (uint32_t j = i + 1; j < n; j++)
			if (a->lanes[i].block == a->lanes[j].block)
				return seterr(EUCLEAN, "arena %d: lanes %u and %u both hold free block %u",
					      aidx, i, j, a->lanes[i].block);
	return 0;
}

static int arena_load(struct btt *b, struct arena *a, int aidx)
{
	size_t flogsize = (size_t)a->lay.nfree * BTT_LOG_GROUP;
	int rc;

	a->lanes = calloc(a->lay.nfree, sizeof(*a->lanes));
	a->rtt = calloc(a->lay.nfree, sizeof(*a->rtt));
	a->flog_shadow = malloc(flogsize);
	if (!a->lanes || !a->rtt || !a->flog_shadow)
		return seterr(ENOMEM, "out of memory");
	for (unsigned i = 0; i < NSTRIPES; i++)
		pthread_mutex_init(&a->stripes[i], NULL);
	rc = map_cache_init(a);
	if (!rc)
		rc = holes_init(b, a);
	if (rc)
		return rc;
	rc = b->io->ops->read(b->io, a->flog_shadow, flogsize, a->base + a->lay.logoff);
	if (!rc)
		rc = flog_detect_scheme(a->flog_shadow, a->lay.nfree, aidx, a->log_index);
	for (uint32_t i = 0; i < a->lay.nfree && !rc; i++)
		rc = lane_load(b, a, aidx, i);
	if (!rc)
		rc = lanes_check_unique(a, aidx);
	a->clean_lanes = a->lay.nfree;
	return rc;
}

static int discover(struct btt *b, const struct btt_open_params *p, uint64_t btt_offset,
		    const struct btt_info *first)
{
	uint64_t rawsize = b->ns_offset + b->ns_size - btt_offset, start = 0, lba = 0;
	uint64_t max_arenas = rawsize / BTT_ARENA_MIN;
	int rc = 0, cap = 0;

	for (;;) {
		struct btt_info ib;
		struct arena *a;

		if ((uint64_t)b->narenas >= max_arenas)
			return seterr(EUCLEAN, "arena chain is longer than the namespace allows");
		if (b->narenas == 0)
			ib = *first;
		else if (start > rawsize - BTT_ARENA_MIN)
			return seterr(EUCLEAN, "arena %d: nextoff leads past the end of the namespace",
				      b->narenas - 1);
		else if ((rc = read_info(b->io, btt_offset + start, p, &ib))) {
			char why[sizeof(errbuf)];
			snprintf(why, sizeof(why), "%s", btt_errmsg());
			return seterr(EUCLEAN, "arena %d: %s (corrupt arena chain)", b->narenas, why);
		}
		if (b->narenas == cap) {
			void *n = realloc(b->arenas, (size_t)(cap ? cap * 2 : 2) * sizeof(*b->arenas));
			if (!n)
				return seterr(ENOMEM, "out of memory");
			b->arenas = n;
			memset(b->arenas + cap, 0, (size_t)(cap ? cap : 2) * sizeof(*b->arenas));
			cap = cap ? cap * 2 : 2;
		}
		a = &b->arenas[b->narenas];
		rc = validate_arena(&ib, b->narenas, start, rawsize, b->narenas ? first : NULL, &a->lay);
		if (rc)
			return rc;
		a->info = ib;
		a->base = btt_offset + start;
		a->lay.lba_start = lba;
		a->sector_size = data_bytes(ib.external_lbasize);
		a->error_flag = ib.flags & BTT_IB_FLAG_ERROR;
		b->narenas++;
		rc = arena_load(b, a, b->narenas - 1);
		if (rc)
			return rc;
		lba += ib.external_nlba;
		if (!ib.nextoff)
			break;
		start += ib.nextoff;
	}
	b->nlba = lba;
	return 0;
}

/* ---- the intent journal (docs/engine.md, "Durability") ------------------------------ */

/*
 * group mode acknowledges writes whose flog/map updates are only staged in memory. So that
 * kill -9 loses none of them, each staged write is appended here with a plain pwrite (the
 * page cache survives the process). Entries of epoch e go to region e % 2: while epoch e
 * is being committed, epoch e + 1 fills the other region. The header names the oldest
 * epoch that may not be committed yet (rewritten at the end of each commit), so on open
 * the entries of that epoch and of the next one are replayed if they were written during
 * this boot (same boot_id), still match their lane's state, and their data block still
 * carries the recorded checksum. After a reboot (power loss) they are ignored: NBD lets
 * unflushed writes be lost, and nothing was committed for them, so every sector keeps its
 * old content.
 */
#define J_MAGIC "BTTJRNL1"
#define J_VERSION 2u
#define J_ENTRY_MAGIC 0x544E454Au
#define J_HDR 64u
#define J_ENTRIES 4096u
#define J_ENTRY 64u

/* One region holds an epoch: at most one entry per lane. */
static uint64_t journal_region(const struct btt *b, uint64_t epoch)
{
	return J_ENTRIES + (epoch & 1) * (uint64_t)b->narenas * BTT_NFREE * J_ENTRY;
}

/* Records that every epoch before `oldest` is committed. */
static int journal_write_header(struct btt *b, uint64_t oldest)
{
	uint8_t h[J_HDR] = {0};

	memcpy(h, J_MAGIC, 8);
	put32(h + 8, J_VERSION);
	memcpy(h + 16, b->uuid, 16);
	memcpy(h + 32, b->boot_id, 16);
	put64(h + 48, oldest);
	put32(h + 12, btt_crc32c(0, h, J_HDR));
	return b->journal->ops->write(b->journal, h, J_HDR, 0);
}

static int journal_append(struct btt *b, uint32_t aidx, uint32_t lane, uint32_t premap,
			  uint32_t block, uint32_t seq, uint32_t data_crc)
{
	uint8_t e[J_ENTRY] = {0};

	if (b->journal_next >= (uint32_t)b->narenas * BTT_NFREE)
		return seterr(ENOSPC, "journal region full"); /* cannot happen: one per lane */
	put32(e, J_ENTRY_MAGIC);
	put64(e + 8, b->epoch);
	put32(e + 16, b->journal_next);
	put32(e + 20, aidx);
	put32(e + 24, lane);
	put32(e + 28, premap);
	put32(e + 32, block);
	put32(e + 36, seq);
	put32(e + 40, data_crc);
	put32(e + 4, btt_crc32c(0, e, J_ENTRY));
	return b->journal->ops->write(b->journal, e, J_ENTRY, journal_region(b, b->epoch) +
				      (uint64_t)b->journal_next++ * J_ENTRY);
}

static int stage_entry(struct btt *b, struct arena *a, uint32_t lane, uint32_t premap,
		       uint32_t block);
static void unreserve_lane(struct btt *b, struct arena *a, uint32_t lane, uint32_t premap);

/* Replays one epoch's region; returns the number of entries staged, or a negative errno. */
static int journal_replay_epoch(struct btt *b, uint64_t epoch, uint8_t *sector)
{
	uint64_t size = b->journal->ops->size(b->journal), base = journal_region(b, epoch);
	uint8_t e[J_ENTRY];
	int replayed = 0;

	for (uint32_t i = 0; i < (uint32_t)b->narenas * BTT_NFREE; i++) {
		uint64_t off = base + (uint64_t)i * J_ENTRY;
		uint32_t aidx, lane, premap, block, seq, dcrc, word, crc;
		struct arena *a;

		if (off + J_ENTRY > size || b->journal->ops->read(b->journal, e, J_ENTRY, off))
			break;
		crc = get32(e + 4);
		put32(e + 4, 0);
		if (get32(e) != J_ENTRY_MAGIC || crc != btt_crc32c(0, e, J_ENTRY) ||
		    get64(e + 8) != epoch || get32(e + 16) != i)
			break;
		aidx = get32(e + 20), lane = get32(e + 24), premap = get32(e + 28);
		block = get32(e + 32), seq = get32(e + 36), dcrc = get32(e + 40);
		if (aidx >= (uint32_t)b->narenas)
			continue;
		a = &b->arenas[aidx];
		/* Only an entry that continues its lane exactly, for an LBA not yet staged,
		 * whose data is on the media, may be applied; any other is stale or torn. */
		if (lane >= a->lay.nfree || premap >= a->lay.external_nlba ||
		    a->lanes[lane].state != LANE_CLEAN || a->lanes[lane].block != block ||
		    a->lanes[lane].seq != seq || stage_find(a, b->cur, premap) >= 0)
			continue;
		if (b->io->ops->read(b->io, sector, b->sector_size, block_off(a, block)) ||
		    btt_crc32c(0, sector, b->sector_size) != dcrc)
			continue;
		if (arena_map_read(b, a, premap, &word) || map_resolve(word, premap) == block)
			continue;
		a->lanes[lane].state = LANE_RESERVED;
		a->clean_lanes--;
		if (stage_entry(b, a, lane, premap, block) == 0)
			replayed++;
		else
			unreserve_lane(b, a, lane, premap);
	}
	return replayed;
}

/* Returns the number of entries replayed, or a negative errno. An epoch's entries use
 * lanes and LBAs the other's do not (btt.c, "the write path"), so the two epochs are
 * replayed as one, oldest first. */
static int journal_replay(struct btt *b)
{
	uint8_t h[J_HDR], *sector = NULL;
	uint64_t oldest;
	uint32_t crc;
	int replayed = 0;

	if (b->journal->ops->size(b->journal) < J_HDR || b->journal->ops->read(b->journal, h, J_HDR, 0))
		return 0;
	crc = get32(h + 12);
	put32(h + 12, 0);
	if (memcmp(h, J_MAGIC, 8) || get32(h + 8) != J_VERSION || crc != btt_crc32c(0, h, J_HDR) ||
	    memcmp(h + 16, b->uuid, 16) || memcmp(h + 32, b->boot_id, 16))
		return 0;
	oldest = get64(h + 48);
	sector = malloc(b->sector_size);
	if (!sector)
		return seterr(ENOMEM, "out of memory");
	uint64_t last = btt_test_mutation == BTT_MUT_REPLAY_ONE_EPOCH ? oldest : oldest + 1;
	for (uint64_t epoch = oldest; epoch <= last && replayed >= 0; epoch++) {
		int r = journal_replay_epoch(b, epoch, sector);
		replayed = r < 0 ? r : replayed + r;
	}
	free(sector);
	if (replayed > 0)
		STAT_ADD(b, journal_replayed, (uint64_t)replayed);
	b->epoch = oldest + 2; /* entries replayed now are committed before any new epoch */
	return replayed;
}

/* ---- the write path ------------------------------------------------------------------ */

/*
 * Epochs and commits. Writes stage into the filling epoch. A commit takes that whole epoch
 * (commit_begin, under elock), runs its I/O without the lock (commit_step: barrier, flog,
 * barrier, map) and retires it (commit_end, under elock): only then do its lanes become
 * clean and their freed blocks reusable. Meanwhile the next epoch fills with the lanes
 * still clean; in group mode a committer thread starts the commit when an epoch has taken
 * half of an arena's lanes, so writers rarely wait for barriers. Two rules keep the two
 * epochs independent, so that recovery and journal replay may treat them as one:
 *   - an LBA staged in the epoch being committed is not written again until its map
 *     word is written (the new entry's old block must be the committed one);
 *   - one commit at a time, in epoch order.
 */

static int commit_locked(struct btt *b, uint64_t epoch);
static void wait_commit_locked(struct btt *b);

/* Publishes the staged entry of a reserved lane whose data is written (elock held). */
static int stage_entry(struct btt *b, struct arena *a, uint32_t lane, uint32_t premap,
		       uint32_t block)
{
	struct lane *ln = &a->lanes[lane];
	pthread_mutex_t *stripe = stripe_of(a, premap);
	struct staged_entry *e;
	uint32_t entry, old;
	int i, rc;

	pthread_mutex_lock(stripe);
	rc = arena_map_read(b, a, premap, &entry);
	old = map_resolve(entry, premap);
	if (!rc && old >= a->lay.internal_nlba)
		rc = seterr(EIO, "map entry 0x%08x of LBA %u points beyond the %u data blocks",
			    entry, premap, a->lay.internal_nlba);
	if (rc) {
		pthread_mutex_unlock(stripe);
		return rc;
	}
	if ((entry & (BTT_MAP_Z | BTT_MAP_E)) == BTT_MAP_E)
		old |= BTT_MAP_E; /* logged so that recovery zero-fills the errored block */
	i = stage_find(a, b->cur, premap);
	if (i >= 0)
		stage_set(a, b->cur, i, premap, 0, BTT_MAP_NORMAL | block);
	else
		stage_insert(a, b->cur, premap, 0, BTT_MAP_NORMAL | block);
	atomic_fetch_add(&a->nvisible[b->cur], 1);
	pthread_mutex_unlock(stripe);
	a->nfilling++;

	e = &b->staged[b->nstaged++];
	e->arena = (uint16_t)(a - b->arenas);
	e->lane = (uint16_t)lane;
	e->premap = premap;
	e->old = old;
	e->new_block = block;
	e->seq = ln->seq;
	e->slot = (uint8_t)a->log_index[ln->sub];
	ln->st_old = old;
	ln->state = LANE_STAGED;
	if (btt_test_mutation == BTT_MUT_REUSE_BEFORE_COMMIT) {
		/* Broken on purpose: the freed block becomes reusable before the commit. */
		ln->block = old & BTT_MAP_MASK;
		ln->seq = seq_next[ln->seq];
		ln->sub ^= 1;
		ln->state = LANE_CLEAN;
		a->clean_lanes++;
		if (lane < a->next_lane)
			a->next_lane = lane;
	}
	return 0;
}

/* Takes a clean lane for premap, committing first when the filling epoch cannot take
 * the write. Returns the lane index or a negative errno (elock held). */
static int reserve_lane(struct btt *b, struct arena *a, uint32_t premap)
{
	uint32_t n = a->lay.nfree;
	int rc;

	for (;;) {
		if (b->failed) /* by a commit of another thread: say so in this one */
			return seterr(-b->failed, "an earlier commit failed; writes are disabled "
				      "until the BTT is reopened");
		if (stage_find(a, b->cur ^ 1, premap) >= 0 &&
		    btt_test_mutation != BTT_MUT_REWRITE_DURING_COMMIT) {
			wait_commit_locked(b); /* the LBA's last write is being committed */
			continue;
		}
		if (a->clean_lanes > 0 && stage_find(a, b->cur, premap) < 0 &&
		    b->nstaged < (uint32_t)b->narenas * BTT_NFREE)
			break;
		if (b->committing) {
			wait_commit_locked(b); /* its end frees lanes: then look again */
			continue;
		}
		rc = commit_locked(b, b->epoch);
		if (rc)
			return rc;
	}
	/* The lowest clean lane: deterministic, and with a commit per write it is always
	 * lane 0, which is what the kernel does on a single CPU (§6.6's example). */
	for (uint32_t i = a->next_lane; i < n; i++) {
		if (a->lanes[i].state == LANE_CLEAN) {
			a->next_lane = i + 1;
			a->lanes[i].state = LANE_RESERVED;
			a->clean_lanes--;
			pthread_mutex_lock(stripe_of(a, premap));
			stage_insert(a, b->cur, premap, STAGE_RESERVED, 0);
			pthread_mutex_unlock(stripe_of(a, premap));
			return (int)i;
		}
	}
	return seterr(EIO, "internal error: no clean lane although %u are counted", a->clean_lanes);
}

static void unreserve_lane(struct btt *b, struct arena *a, uint32_t lane, uint32_t premap)
{
	int i;

	a->lanes[lane].state = LANE_CLEAN;
	a->clean_lanes++;
	if (lane < a->next_lane)
		a->next_lane = lane;
	pthread_mutex_lock(stripe_of(a, premap));
	i = stage_find(a, b->cur, premap);
	if (i >= 0)
		atomic_store(&a->stage[b->cur][i], STAGE_TOMB << 32);
	pthread_mutex_unlock(stripe_of(a, premap));
}

/* One sector: reserve -> data -> publish (§7.3 with the flog/map writes deferred). */
static int write_sector(struct btt *b, struct arena *a, uint32_t premap, const uint8_t *src)
{
	uint32_t block, lane, crc = 0;
	int rc, l;

	pthread_mutex_lock(&b->elock);
	l = reserve_lane(b, a, premap);
	if (l < 0) {
		pthread_mutex_unlock(&b->elock);
		return l;
	}
	lane = (uint32_t)l;
	block = a->lanes[lane].block;
	b->inflight++;
	pthread_mutex_unlock(&b->elock);

	rtt_wait(a, block);
	block_written(a, block);
	rc = b->io->ops->write(b->io, src, a->sector_size, block_off(a, block));
	if (!rc && b->journal)
		crc = btt_crc32c(0, src, a->sector_size);

	pthread_mutex_lock(&b->elock);
	b->inflight--;
	if (!rc) {
		uint32_t seq = a->lanes[lane].seq;
		rc = stage_entry(b, a, lane, premap, block);
		if (rc)
			unreserve_lane(b, a, lane, premap);
		else if (b->journal &&
			 journal_append(b, (uint32_t)(a - b->arenas), lane, premap, block, seq, crc))
			rc = commit_locked(b, b->epoch); /* no journal protection: commit it instead */
		if (!rc) {
			STAT_ADD(b, writes, 1);
			if (a->nfilling == a->lay.nfree / 2 && b->durability == BTT_DUR_GROUP) {
				b->kick = true; /* to the committer, if one runs */
				pthread_cond_signal(&b->tcond);
			}
		}
	} else {
		unreserve_lane(b, a, lane, premap);
	}
	pthread_cond_broadcast(&b->econd);
	pthread_mutex_unlock(&b->elock);
	return rc;
}

static int write_flog(struct btt *b)
{
	for (int ai = 0; ai < b->narenas; ai++) {
		struct arena *a = &b->arenas[ai];
		uint32_t lo = UINT32_MAX, hi = 0;

		for (uint32_t k = 0; k < b->ncstaged; k++) {
			const struct staged_entry *e = &b->cstaged[k];
			struct flog_entry f = {e->premap, e->old, e->new_block, e->seq};
			if (e->arena != ai)
				continue;
			flog_slot_put(a->flog_shadow + (size_t)e->lane * BTT_LOG_GROUP, e->slot, &f);
			lo = e->lane < lo ? e->lane : lo;
			hi = e->lane > hi ? e->lane : hi;
		}
		if (lo == UINT32_MAX)
			continue;
		/* One write for the dirty lanes' groups: unchanged bytes are rewritten with
		 * the same values, and each 16-byte slot sits inside one 512-byte sector. */
		int rc = b->io->ops->write(b->io, a->flog_shadow + (size_t)lo * BTT_LOG_GROUP,
					   (size_t)(hi - lo + 1) * BTT_LOG_GROUP,
					   a->base + a->lay.logoff + (uint64_t)lo * BTT_LOG_GROUP);
		if (rc)
			return rc;
	}
	return 0;
}

static int staged_order(const void *x, const void *y)
{
	const struct staged_entry *e = x, *f = y;

	if (e->arena != f->arena)
		return e->arena < f->arena ? -1 : 1;
	return e->premap < f->premap ? -1 : e->premap > f->premap;
}

/* The map words of staged entries e[0..n), all in one map page of arena a and sorted by
 * LBA, with one backend write: the span from the first to the last is written from the
 * cached page, so the words in between are rewritten with the values they already have
 * (the page lock keeps every other map writer out meanwhile). Each 4-byte entry lies in
 * one 512-byte sector, so a torn span still changes every entry entirely or not at all. */
static int write_map_page(struct btt *b, struct arena *a, const struct staged_entry *e, uint32_t n)
{
	uint8_t raw[BTT_PG_SIZE];
	uint32_t page = e[0].premap / MAP_PAGE_WORDS, lo = e[0].premap % MAP_PAGE_WORDS;
	uint32_t hi = e[n - 1].premap % MAP_PAGE_WORDS;
	struct map_page *s = map_slot(a, page);
	bool hit = false;
	int rc = 0;

	if (n > 1) {
		pthread_mutex_lock(&s->lock);
		rc = map_cached_locked(b, a, s, page, &hit);
		if (!rc && hit) {
			for (uint32_t k = 0; k < n; k++)
				s->words[e[k].premap % MAP_PAGE_WORDS] = BTT_MAP_NORMAL | e[k].new_block;
			for (uint32_t i = lo; i <= hi; i++)
				put32(raw + 4 * (i - lo), s->words[i]);
			map_page_written(a, page);
			rc = b->io->ops->write(b->io, raw, (size_t)(hi - lo + 1) * 4,
					       map_off(a, page * MAP_PAGE_WORDS + lo));
			if (rc)
				s->held = false; /* what reached the media is unknown */
		}
		pthread_mutex_unlock(&s->lock);
		if (rc || hit)
			return rc;
	}
	/* One entry, or a page the cache does not hold: entry by entry. */
	for (uint32_t k = 0; k < n && !rc; k++)
		rc = arena_map_write(b, a, e[k].premap, BTT_MAP_NORMAL | e[k].new_block);
	return rc;
}

/* The commit's last step: every staged map word, each dirty map page written once. Only
 * once an entry's word is in the map does it leave the staged table readers consult. */
static int write_maps(struct btt *b)
{
	int t = b->cur ^ 1; /* the committing epoch's table */

	qsort(b->cstaged, b->ncstaged, sizeof(*b->cstaged), staged_order);
	for (uint32_t k = 0, end; k < b->ncstaged; k = end) {
		const struct staged_entry *e = &b->cstaged[k];
		struct arena *a = &b->arenas[e->arena];
		int rc;

		for (end = k + 1; end < b->ncstaged && b->cstaged[end].arena == e->arena &&
				  b->cstaged[end].premap / MAP_PAGE_WORDS == e->premap / MAP_PAGE_WORDS;
		     end++)
			;
		rc = write_map_page(b, a, e, end - k);
		if (rc)
			return rc;
		for (uint32_t j = k; j < end; j++) {
			pthread_mutex_t *stripe = stripe_of(a, b->cstaged[j].premap);
			int i;

			pthread_mutex_lock(stripe);
			if ((i = stage_find(a, t, b->cstaged[j].premap)) >= 0) {
				atomic_store(&a->stage[t][i], STAGE_TOMB << 32);
				atomic_fetch_sub(&a->nvisible[t], 1);
			}
			pthread_mutex_unlock(stripe);
		}
	}
	return 0;
}

/* After the commit: each lane's freed block becomes its next free block (§6.6). */
static void advance_lanes(struct btt *b)
{
	static const uint8_t zeros[65536];

	if (btt_test_mutation == BTT_MUT_REUSE_BEFORE_COMMIT)
		return; /* the broken variant advanced them at publish time */
	for (uint32_t k = 0; k < b->ncstaged; k++) {
		const struct staged_entry *e = &b->cstaged[k];
		struct arena *a = &b->arenas[e->arena];
		struct lane *ln = &a->lanes[e->lane];

		ln->seq = seq_next[e->seq];
		ln->sub ^= 1;
		ln->block = e->old & BTT_MAP_MASK;
		if (e->old & BTT_MAP_E) { /* as the kernel: clear the errored block */
			block_written(a, ln->block);
			b->io->ops->write(b->io, zeros, a->lay.internal_lbasize, block_off(a, ln->block));
		}
		ln->state = LANE_CLEAN;
		a->clean_lanes++;
		a->next_lane = 0;
	}
}

/* What the steps of a commit do, in order. The test-only mutations break the order. */
enum commit_op { C_NOTHING, C_BARRIER, C_FLOG, C_MAPS };
#define C_STEPS 4

static const enum commit_op *commit_order(void)
{
	/* The staged data is durable before any flog entry names it, and the flog before
	 * any map entry (§7.3). */
	static const enum commit_op correct[C_STEPS] = {C_BARRIER, C_FLOG, C_BARRIER, C_MAPS};
	static const enum commit_op map_first[C_STEPS] = {C_BARRIER, C_MAPS, C_FLOG, C_BARRIER};
	static const enum commit_op flog_early[C_STEPS] = {C_NOTHING, C_FLOG, C_BARRIER, C_MAPS};
	static const enum commit_op no_barrier2[C_STEPS] = {C_BARRIER, C_FLOG, C_NOTHING, C_MAPS};

	return btt_test_mutation == BTT_MUT_MAP_BEFORE_FLOG ? map_first :
	       btt_test_mutation == BTT_MUT_FLOG_BEFORE_DATA_DURABLE ? flog_early :
	       btt_test_mutation == BTT_MUT_FLUSH_BEFORE_BARRIER2 ? no_barrier2 : correct;
}

/* Takes the filling epoch for commit; the next one starts empty, in the other stage
 * tables and journal region (elock held, nothing in flight, no commit running). */
static void commit_begin(struct btt *b)
{
	struct staged_entry *batch = b->staged;

	b->staged = b->cstaged;
	b->cstaged = batch;
	b->ncstaged = b->nstaged;
	b->nstaged = 0;
	b->cur ^= 1;
	for (int ai = 0; ai < b->narenas; ai++)
		b->arenas[ai].nfilling = 0;
	b->epoch++;
	b->journal_next = 0;
	b->kick = false;
	b->committing = true;
	if (btt_test_mutation == BTT_MUT_JOURNAL_RETIRED_EARLY && b->journal)
		journal_write_header(b, b->epoch); /* broken on purpose: before the commit's I/O */
}

/* One step of the commit's I/O. No lock: the batch and its stage tables are the commit's
 * alone until commit_end, and writers of the next epoch touch neither. */
static int commit_step(struct btt *b, int k)
{
	switch (commit_order()[k]) {
	case C_BARRIER:
		return barrier(b);
	case C_FLOG:
		return write_flog(b);
	case C_MAPS:
		return write_maps(b);
	default:
		return 0;
	}
}

/* Retires the committed epoch: its lanes advance to the blocks it freed (elock held). */
static int commit_end(struct btt *b, int rc)
{
	b->committing = false;
	pthread_cond_broadcast(&b->econd);
	if (rc) {
		/* What reached the media is repairable by recovery, but this process can no
		 * longer tell what did: refuse further writes until the BTT is reopened. The
		 * batch stays staged, so reads still return the acknowledged data. */
		b->failed = -EIO;
		return seterr(-rc == ENOSPC ? ENOSPC : EIO, "commit failed, writes disabled until "
			      "reopen: %s", btt_errmsg());
	}
	if (commit_order()[0] == C_BARRIER)
		b->unsynced_zero = false; /* the data barrier covered zero-flag map writes too */
	advance_lanes(b);
	b->ncstaged = 0;
	for (int ai = 0; ai < b->narenas; ai++)
		stage_reset(&b->arenas[ai], b->cur ^ 1);
	STAT_ADD(b, commits, 1);
	if (b->journal && journal_write_header(b, b->epoch)) {
		b->failed = -EIO;
		return seterr(EIO, "journal header write failed: %s", btt_errmsg());
	}
	return 0;
}

/* Waits for the running commit to end (elock held). A commit a test is stepping has no
 * thread of its own: the waiter runs its remaining steps. */
static void wait_commit_locked(struct btt *b)
{
	int rc = 0;

	if (b->cstep < 0) {
		pthread_cond_wait(&b->econd, &b->elock);
		return;
	}
	while (b->cstep < C_STEPS && !rc)
		rc = commit_step(b, b->cstep++);
	b->cstep = -1;
	commit_end(b, rc);
}

/* Waits until no write is in flight and no commit runs (elock held). */
void quiesce_locked(struct btt *b)
{
	while (b->committing || b->inflight) {
		if (b->committing)
			wait_commit_locked(b);
		else
			pthread_cond_wait(&b->econd, &b->elock);
	}
}

/* Commits epoch `epoch`, the one the caller saw when it decided a commit was needed, and
 * returns once it is committed. While this thread waits (for writers in flight, or for
 * the commit before), another may commit that epoch; then the caller's need is met, and
 * committing again would cost two barriers for the few writes staged since (with 16
 * writers, a quarter of all commits were such). Returns 0 with no commit running. */
static int commit_locked(struct btt *b, uint64_t epoch)
{
	int rc = 0;

	for (;;) {
		if (b->failed) /* by a commit of another thread: say so in this one */
			return seterr(-b->failed, "an earlier commit failed; writes are disabled "
				      "until the BTT is reopened");
		if (b->committing)
			wait_commit_locked(b); /* the caller's epoch, or the one before it */
		else if (b->epoch != epoch)
			return 0;
		else if (b->inflight)
			pthread_cond_wait(&b->econd, &b->elock);
		else
			break;
	}
	if (b->nstaged == 0) {
		/* Zero-flag map writes have no flog entry that recovery could redo: a FLUSH
		 * must make them durable itself. */
		if (b->unsynced_zero && (rc = barrier(b)) == 0)
			b->unsynced_zero = false;
		if (rc)
			b->failed = -EIO;
		return rc ? seterr(EIO, "flush failed, writes disabled until reopen: %s",
				   btt_errmsg()) : 0;
	}
	if (b->readonly)
		return seterr(EROFS, "read-only");
	commit_begin(b);
	pthread_mutex_unlock(&b->elock);
	for (int k = 0; k < C_STEPS && !rc; k++)
		rc = commit_step(b, k);
	pthread_mutex_lock(&b->elock);
	return commit_end(b, rc);
}

static struct arena *arena_of(struct btt *b, uint64_t lba, uint32_t *premap)
{
	int lo = 0, hi = b->narenas - 1;

	while (lo < hi) {
		int mid = (lo + hi + 1) / 2;
		if (b->arenas[mid].lay.lba_start <= lba)
			lo = mid;
		else
			hi = mid - 1;
	}
	*premap = (uint32_t)(lba - b->arenas[lo].lay.lba_start);
	return &b->arenas[lo];
}

static int check_range(struct btt *b, uint64_t lba, uint64_t count)
{
	if (lba > b->nlba || count > b->nlba - lba)
		return seterr(EINVAL, "sectors [%llu, +%llu) are beyond the %llu sectors of the BTT",
			      (unsigned long long)lba, (unsigned long long)count,
			      (unsigned long long)b->nlba);
	return 0;
}

static int do_flush(struct btt *b);

static int do_write(struct btt *b, uint64_t lba, uint64_t count, const void *buf, int flags)
{
	static const uint8_t zeros[4096];
	const uint8_t *src = buf;
	int rc = check_range(b, lba, count);

	if (rc)
		return rc;
	if (b->readonly)
		return seterr(EROFS, "the BTT is open read-only");
	if (b->failed)
		return seterr(EIO, "writes are disabled after a failed commit; reopen the BTT");
	for (uint64_t i = 0; i < count && !rc; i++) {
		uint32_t premap;
		struct arena *a = arena_of(b, lba + i, &premap);
		if (a->error_flag)
			return seterr(EROFS, "arena %d has its error flag set; it is read-only",
				      (int)(a - b->arenas));
		rc = write_sector(b, a, premap, src ? src + i * b->sector_size : zeros);
	}
	if (!rc && (b->durability != BTT_DUR_GROUP || (flags & BTT_FUA)))
		rc = do_flush(b);
	return rc;
}

/* Zero-flag extension: the sectors keep their blocks and read as zeros (§8). One 4-byte map
 * store per sector is atomic, so no flog entry is needed; staged writes are committed
 * first so the map words changed here are the committed ones. */
static int zero_run(struct btt *b, struct arena *a, uint32_t premap, uint32_t n)
{
	uint32_t words[1024];
	int rc;

	/* A run of at most 1024 entries spans at most 65 of the 256 stripes: no lock twice. */
	for (uint32_t s = premap >> 4; s <= (premap + n - 1) >> 4; s++)
		pthread_mutex_lock(&a->stripes[s % NSTRIPES]);
	rc = map_get(b, a, premap, n, words);
	for (uint32_t i = 0; !rc && i < n; i++) {
		uint32_t block = map_resolve(words[i], premap + i);
		if (block >= a->lay.internal_nlba)
			rc = seterr(EIO, "map entry of LBA %llu points beyond the data blocks",
				    (unsigned long long)(a->lay.lba_start + premap + i));
		words[i] = BTT_MAP_Z | block;
	}
	if (!rc)
		rc = map_put(b, a, premap, n, words);
	for (uint32_t s = premap >> 4; s <= (premap + n - 1) >> 4; s++)
		pthread_mutex_unlock(&a->stripes[s % NSTRIPES]);
	return rc;
}

static int do_set_zero(struct btt *b, uint64_t lba, uint64_t count, int flags)
{
	int rc = check_range(b, lba, count);

	if (rc)
		return rc;
	if (b->readonly)
		return seterr(EROFS, "the BTT is open read-only");
	pthread_mutex_lock(&b->elock);
	do /* everything staged, including what others staged while this thread waited */
		rc = commit_locked(b, b->epoch);
	while (!rc && b->nstaged);
	while (!rc && count) {
		uint32_t premap;
		struct arena *a = arena_of(b, lba, &premap);
		uint64_t left = a->lay.external_nlba - premap;
		uint32_t n = (uint32_t)(count < left ? count : left);
		if (a->error_flag) {
			rc = seterr(EROFS, "arena %d has its error flag set; it is read-only",
				    (int)(a - b->arenas));
			break;
		}
		n = n > 1024 ? 1024 : n;
		rc = zero_run(b, a, premap, n);
		lba += n, count -= n;
	}
	if (!rc)
		b->unsynced_zero = true;
	if (!rc && (b->durability == BTT_DUR_STRICT || (flags & BTT_FUA)) && (rc = barrier(b)) == 0)
		b->unsynced_zero = false;
	pthread_mutex_unlock(&b->elock);
	if (rc && !b->failed && rc != -EROFS && rc != -EINVAL)
		b->failed = -EIO; /* a partial map update: reopen to know what landed */
	return rc;
}

static int do_flush(struct btt *b)
{
	int rc;

	if (b->readonly)
		return 0;
	pthread_mutex_lock(&b->elock);
	rc = commit_locked(b, b->epoch);
	pthread_mutex_unlock(&b->elock);
	if (b->failed && !rc)
		rc = seterr(EIO, "an earlier commit failed; nothing is durable until reopen");
	return rc;
}

/* ---- the read path (§7.2) ------------------------------------------------------------ */

/* Sectors of a read whose blocks follow one another in the file, copied with one pread.
 * `slot` is the RTT slot that publishes them. */
struct read_span {
	uint32_t slot, first, count;
	uint8_t *dst;
};

static int span_copy(struct btt *b, struct arena *a, struct read_span *s)
{
	int rc = 0;

	if (!s->count)
		return 0;
	STAT_ADD(b, data_reads, 1);
	rc = b->io->ops->read(b->io, s->dst, (size_t)s->count * a->sector_size,
			      block_off(a, s->first));
	atomic_store(&a->rtt[s->slot], RTT_PENDING);
	s->count = 0;
	return rc;
}

/* Reads sectors [premap, premap+n) of one arena. Each sector's mapping is looked up
 * (staged table, then the map) and published in the RTT under its map lock, so no writer
 * can reuse the block before the copy is done. Sectors whose blocks are consecutive in the
 * file are gathered into a span and copied with one pread (a sequentially written range
 * mostly is: 32 preads per 128 KiB read became one or two). A block that does not extend
 * the span is published in a second slot, and the span is copied before the next one
 * starts, so each block is covered from its lookup until its copy is done. A reader that
 * finds no second slot free (more readers than slots) copies each sector at once with its
 * one slot, as readers did before spans: waiting for a second slot while holding one could
 * deadlock with other readers doing the same. */
static int read_run(struct btt *b, struct arena *a, uint32_t premap, uint32_t n, uint8_t *dst)
{
	/* blocks are sector-sized only then; otherwise every span is one sector long */
	bool gather = a->lay.internal_lbasize == a->sector_size, two_slots;
	struct read_span span = {0}, next = {0};
	int rc = 0;

	atomic_fetch_add(&a->readers, 1);
	span.slot = rtt_acquire(a);
	two_slots = rtt_try_acquire(a, &next.slot);
	if (!two_slots) {
		next.slot = span.slot; /* empty whenever a block is published in it: see below */
		gather = false;
	}

	for (uint32_t i = 0; i < n && !rc; i++, dst += a->sector_size) {
		uint32_t p = premap + i, entry, block;
		pthread_mutex_t *stripe = stripe_of(a, p);
		bool zero_flag, hole, extends = false;

		pthread_mutex_lock(stripe);
		if (!staged_lookup(a, p, &entry))
			rc = arena_map_read(b, a, p, &entry);
		block = map_resolve(entry, p);
		if (!rc && (entry & (BTT_MAP_Z | BTT_MAP_E)) == BTT_MAP_E)
			rc = seterr(EIO, "LBA %llu has a media error (map entry 0x%08x)",
				    (unsigned long long)(a->lay.lba_start + p), entry);
		else if (!rc && block >= a->lay.internal_nlba)
			rc = seterr(EIO, "map entry 0x%08x of LBA %llu points beyond the %u data blocks",
				    entry, (unsigned long long)(a->lay.lba_start + p),
				    a->lay.internal_nlba);
		/* Z: every sector reads zeros, unlike Linux (§10.1); a hole needs no read */
		zero_flag = (entry & (BTT_MAP_Z | BTT_MAP_E)) == BTT_MAP_Z;
		hole = !rc && !zero_flag && block_is_hole(a, block);
		if (!rc && !zero_flag && !hole) {
			extends = gather && span.count && block == span.first + span.count;
			if (extends)
				atomic_store(&a->rtt[span.slot], rtt_range(span.first, ++span.count));
			else
				atomic_store(&a->rtt[next.slot], rtt_range(block, 1));
		}
		pthread_mutex_unlock(stripe);
		if (rc || extends)
			continue;
		rc = span_copy(b, a, &span); /* the span ends here */
		if (zero_flag || hole) {
			memset(dst, 0, a->sector_size);
			STAT_ADD(b, hole_reads, hole);
		} else {
			struct read_span started = next;
			next = span, span = started; /* the slot just published holds the new span */
			span.first = block, span.count = 1, span.dst = dst;
			if (!two_slots)
				rc = span_copy(b, a, &span);
		}
	}
	if (!rc)
		rc = span_copy(b, a, &span);
	atomic_store(&a->rtt[span.slot], 0);
	if (two_slots)
		atomic_store(&a->rtt[next.slot], 0);
	atomic_fetch_sub(&a->readers, 1);
	return rc;
}

static int do_read(struct btt *b, uint64_t lba, uint64_t count, void *buf)
{
	uint8_t *dst = buf;
	int rc = check_range(b, lba, count);

	while (!rc && count) {
		uint32_t premap;
		struct arena *a = arena_of(b, lba, &premap);
		uint64_t left = a->lay.external_nlba - premap;
		uint32_t n = (uint32_t)(count < left ? count : left);
		if (n > 256)
			n = 256;
		rc = read_run(b, a, premap, n, dst);
		dst += (size_t)n * b->sector_size, lba += n, count -= n;
	}
	return rc;
}

/* ---- block status (NBD base:allocation) ----------------------------------------------
 *
 * A copy (qemu-img convert, nbdcopy) skips what the server calls a hole, so a hole must
 * never be claimed for a sector that reads anything but zeros; calling zeros data only
 * costs the copy a read. An LBA reads as zeros, exactly as in read_run, when its map entry
 * has Z (without E), or when it maps to a block that is a hole in the file (the data-hole
 * bits: set at open, cleared before any write to the block). Writes still staged are data.
 * Two bitmaps make a sparse namespace cheap: a map page that is a hole holds identity
 * entries only, so a run of such pages is answered from the data-hole bits, 64 units per
 * load, without reading the map; only map pages that were written are read. */

bool extent_add(struct extent_list *l, uint64_t offset, uint64_t length, uint32_t type)
{
	struct btt_extent *last = l->n ? &l->v[l->n - 1] : NULL;

	if (last && last->type == type && last->offset + last->length == offset) {
		last->length += length;
		return true;
	}
	if (l->n == l->max) {
		l->full = true;
		return false;
	}
	l->v[l->n++] = (struct btt_extent){.offset = offset, .length = length, .type = type};
	return true;
}

/* Whole sectors were described: trim the first and last extents to the bytes asked for. */
void extents_clip(struct extent_list *l, uint64_t off, uint64_t len)
{
	struct btt_extent *first = &l->v[0], *last = &l->v[l->n - 1];

	if (first->offset < off) {
		first->length -= off - first->offset;
		first->offset = off;
	}
	if (last->offset + last->length > off + len)
		last->length = off + len - last->offset;
}

/* The first unit in [u, end) whose bit is not `set`, or end; 64 units per load. */
static uint64_t bits_run_end(_Atomic uint64_t *bits, uint64_t u, uint64_t end, bool set)
{
	while (u < end) {
		uint64_t w = atomic_load_explicit(&bits[u / 64], memory_order_relaxed);
		uint64_t differ = (set ? ~w : w) >> (u % 64);

		if (differ) {
			u += (uint64_t)__builtin_ctzll(differ);
			return u < end ? u : end;
		}
		u = (u / 64 + 1) * 64;
	}
	return end;
}

static void lba_extent(struct btt *b, struct arena *a, struct extent_list *l, uint32_t premap,
		       uint64_t n, uint32_t type)
{
	extent_add(l, (a->lay.lba_start + premap) * b->sector_size, n * b->sector_size, type);
}

static int u32_order(const void *x, const void *y)
{
	uint32_t p = *(const uint32_t *)x, q = *(const uint32_t *)y;

	return p < q ? -1 : p > q;
}

/* The LBAs in [lo, hi) of arena a with a visible staged write, sorted. Scanned before the
 * map is read: a write leaves the tables only after its map word is written (write_maps),
 * so one this scan misses is in the map by then, or was not acknowledged when the scan
 * began. A staged write has put data in a block: these LBAs are data. */
static uint32_t staged_between(struct arena *a, uint32_t lo, uint32_t hi, uint32_t *out)
{
	uint32_t n = 0;

	for (int t = 0; t < 2; t++) {
		if (atomic_load(&a->nvisible[t]) == 0)
			continue;
		for (uint32_t i = 0; i < STAGE_SLOTS; i++) {
			uint64_t v = atomic_load(&a->stage[t][i]);
			uint32_t key = (uint32_t)(v >> 32);
			if (v != STAGE_EMPTY && !(key & STAGE_RESERVED) && key - 1 >= lo && key - 1 < hi)
				out[n++] = key - 1;
		}
	}
	qsort(out, n, sizeof(*out), u32_order);
	return n;
}

/* What an LBA with this map entry reads as: the rules of read_run. */
static uint32_t entry_type(const struct arena *a, uint32_t entry, uint32_t premap)
{
	uint32_t flags = entry & (BTT_MAP_Z | BTT_MAP_E), block = map_resolve(entry, premap);

	if (flags == BTT_MAP_Z)
		return BTT_EXTENT_HOLE;
	if (flags == BTT_MAP_E || block >= a->lay.internal_nlba)
		return 0; /* its read fails: not zeros */
	return block_is_hole(a, block) ? BTT_EXTENT_HOLE : 0;
}

/* LBAs [p, q) of arena a that map to their own blocks. Block k lies in data units
 * [k * ilbs / UNIT, ((k + 1) * ilbs - 1) / UNIT], and reads as zeros if all are holes
 * (block_is_hole): so the blocks wholly inside a run of hole units are one hole, and
 * those that start in a run of data units are data. */
static void identity_extents(struct btt *b, struct arena *a, uint32_t p, uint32_t q,
			     struct extent_list *l)
{
	uint64_t ilbs = a->lay.internal_lbasize, units = data_hole_units(a);
	/* scans stop at the units of block q - 1: nothing past them is needed */
	uint64_t uend = ((uint64_t)q * ilbs - 1) / DATA_HOLE_UNIT + 1;

	if (uend > units)
		uend = units;
	while (p < q && !l->full) {
		uint64_t u = (uint64_t)p * ilbs / DATA_HOLE_UNIT, next;
		uint32_t type = 0;

		if (u < units && hole_bit(a->data_hole, u)) {
			uint64_t h = bits_run_end(a->data_hole, u, uend, true);
			next = h * DATA_HOLE_UNIT / ilbs;
			type = BTT_EXTENT_HOLE;
			if (next <= p) { /* block p reaches into the data unit h */
				next = p + 1;
				type = 0;
			}
		} else {
			uint64_t d = u < uend ? bits_run_end(a->data_hole, u, uend, false) : uend;
			next = d >= uend ? q : (d * DATA_HOLE_UNIT + ilbs - 1) / ilbs;
		}
		if (next > q)
			next = q;
		lba_extent(b, a, l, p, next - p, type);
		p = (uint32_t)next;
	}
}

/* Extents of LBAs [p, end) of arena a. */
static int arena_extents(struct btt *b, struct arena *a, uint32_t p, uint32_t end,
			 struct extent_list *l)
{
	uint32_t staged[2 * STAGE_SLOTS], words[MAP_PAGE_WORDS];
	uint32_t nstaged = staged_between(a, p, end, staged), si = 0;
	/* the map pages up to that of LBA end - 1: scans of their bits stop there */
	uint64_t pages = ((uint64_t)end - 1) / MAP_PAGE_WORDS + 1;
	int rc = 0;

	while (p < end && !l->full && !rc) {
		uint32_t page = p / MAP_PAGE_WORDS, stop = end, q;

		while (si < nstaged && staged[si] < p)
			si++;
		if (si < nstaged && staged[si] == p) {
			lba_extent(b, a, l, p++, 1, 0);
			continue;
		}
		if (si < nstaged)
			stop = staged[si];
		if (map_page_is_hole(a, page)) {
			/* identity entries up to the next page that was written */
			uint64_t run = bits_run_end(a->map_hole, page, pages, true) * MAP_PAGE_WORDS;
			q = run < stop ? (uint32_t)run : stop;
			identity_extents(b, a, p, q, l);
		} else {
			/* read through the cache under its slot locks, as a read does */
			uint32_t page_end = (page + 1) * MAP_PAGE_WORDS;
			q = page_end < stop ? page_end : stop;
			rc = map_get(b, a, p, q - p, words);
			for (uint32_t i = 0; !rc && !l->full && i < q - p; i++)
				lba_extent(b, a, l, p + i, 1, entry_type(a, words[i], p + i));
		}
		p = q;
	}
	return rc;
}

static int do_block_status(struct btt *b, uint64_t off, uint64_t len, struct btt_extent *out,
			   uint32_t max, uint32_t *n)
{
	uint64_t ss = b->sector_size, size = b->nlba * ss, lba = off / ss, end;
	struct extent_list l = {.v = out, .max = max};
	int rc = 0;

	if (max == 0 || len == 0 || off > size || len > size - off)
		return seterr(EINVAL, "block status of [%llu, +%llu) in at most %u extents: outside "
			      "the %llu-byte BTT, or empty", (unsigned long long)off,
			      (unsigned long long)len, max, (unsigned long long)size);
	end = (off + len + ss - 1) / ss;
	while (lba < end && !l.full && !rc) {
		uint32_t premap;
		struct arena *a = arena_of(b, lba, &premap);
		uint64_t left = a->lay.external_nlba - premap;
		uint32_t k = (uint32_t)(end - lba < left ? end - lba : left);

		rc = arena_extents(b, a, premap, premap + k, &l);
		lba += k;
	}
	if (!rc) {
		extents_clip(&l, off, len);
		*n = l.n;
	}
	return rc;
}

/* ---- byte-addressed entry points (the NBD server's hot path) -------------------------- */

static int byte_range(struct btt *b, uint64_t len, uint64_t off)
{
	if (len > BTT_MAX_REQUEST)
		return seterr(EINVAL, "request of %llu bytes is larger than the %u advertised",
			      (unsigned long long)len, BTT_MAX_REQUEST);
	if (off % b->sector_size || len % b->sector_size)
		return seterr(EINVAL, "request [%llu, +%llu) is not aligned to %u-byte sectors",
			      (unsigned long long)off, (unsigned long long)len, b->sector_size);
	return 0;
}

/* ---- the public entry points: each counts itself in, so shutdown can wait for it --- */

int btt_read(struct btt *b, uint64_t lba, uint64_t count, void *buf)
{
	int rc = guard_enter(&b->guard);
	if (rc)
		return rc;
	rc = do_read(b, lba, count, buf);
	guard_leave(&b->guard);
	return rc;
}

int btt_write(struct btt *b, uint64_t lba, uint64_t count, const void *buf, int flags)
{
	int rc = guard_enter(&b->guard);
	if (rc)
		return rc;
	rc = do_write(b, lba, count, buf, flags);
	guard_leave(&b->guard);
	return rc;
}

int btt_write_zeroes(struct btt *b, uint64_t lba, uint64_t count, int flags)
{
	return btt_write(b, lba, count, NULL, flags);
}

int btt_set_zero(struct btt *b, uint64_t lba, uint64_t count, int flags)
{
	int rc = guard_enter(&b->guard);
	if (rc)
		return rc;
	rc = do_set_zero(b, lba, count, flags);
	guard_leave(&b->guard);
	return rc;
}

int btt_flush(struct btt *b)
{
	int rc = guard_enter(&b->guard);
	if (rc)
		return rc;
	rc = do_flush(b);
	guard_leave(&b->guard);
	return rc;
}

int btt_block_status(struct btt *b, uint64_t off, uint64_t len, struct btt_extent *out,
		     uint32_t max, uint32_t *n)
{
	int rc = guard_enter(&b->guard);

	*n = 0;
	if (rc)
		return rc;
	rc = do_block_status(b, off, len, out, max, n);
	guard_leave(&b->guard);
	return rc;
}

int btt_pread(struct btt *b, void *buf, uint64_t len, uint64_t off)
{
	int rc = byte_range(b, len, off);
	return rc ? rc : btt_read(b, off / b->sector_size, len / b->sector_size, buf);
}

int btt_pwrite(struct btt *b, const void *buf, uint64_t len, uint64_t off, int flags)
{
	int rc = byte_range(b, len, off);
	return rc ? rc : btt_write(b, off / b->sector_size, len / b->sector_size, buf, flags);
}

/* ---- open / close ---------------------------------------------------------------- */

static void free_btt(struct btt *b)
{
	for (int i = 0; i < b->narenas; i++) {
		free(b->arenas[i].lanes);
		free((void *)b->arenas[i].rtt);
		free(b->arenas[i].flog_shadow);
		map_cache_free(&b->arenas[i]);
	}
	free(b->arenas);
	free(b->staged);
	free(b->cstaged);
	free(b);
}

int btt_open(struct btt_io *io, const struct btt_open_params *p, struct btt **out)
{
	static const int order_auto[] = {11, 20}, order_11[] = {11}, order_20[] = {20};
	const int *order = p->version == 11 ? order_11 : p->version == 20 ? order_20 : order_auto;
	int norder = p->version ? 1 : 2, rc = 0, found = -1;
	struct btt_info first;
	char why[2][200] = {"", ""};
	struct btt *b;

	if (p->version && p->version != 11 && p->version != 20)
		return seterr(EINVAL, "version must be 1.1 or 2.0");
	if (p->durability < BTT_DUR_GROUP || p->durability > BTT_DUR_NONE)
		return seterr(EINVAL, "unknown durability mode %d", p->durability);
	if (p->ns_offset + p->ns_size < p->ns_offset || io->ops->size(io) < p->ns_offset + p->ns_size)
		return seterr(EINVAL, "namespace [%llu, +%llu) lies beyond the end of the backing store",
			      (unsigned long long)p->ns_offset, (unsigned long long)p->ns_size);
	for (int k = 0; k < norder && found < 0; k++) {
		uint64_t initial = order[k] == 11 ? BTT_PG_SIZE : 0;
		if (p->ns_size < initial + BTT_ARENA_MIN) {
			snprintf(why[k], sizeof(why[k]), "namespace too small for BTT %s",
				 order[k] == 11 ? "1.1" : "2.0");
			continue;
		}
		rc = read_info(io, p->ns_offset + initial, p, &first);
		if (!rc && !(first.version_major == order[k] / 10 && first.version_minor == order[k] % 10))
			rc = seterr(ENODEV, "info block at offset %llu is version %u.%u, expected %d.%d",
				    (unsigned long long)(p->ns_offset + initial), first.version_major,
				    first.version_minor, order[k] / 10, order[k] % 10);
		if (rc)
			snprintf(why[k], sizeof(why[k]), "%s", btt_errmsg());
		else
			found = k;
	}
	if (found < 0)
		return seterr(ENODEV, "no valid BTT: %s%s%s", why[0], norder > 1 ? "; " : "",
			      norder > 1 ? why[1] : "");

	b = calloc(1, sizeof(*b));
	if (!b)
		return seterr(ENOMEM, "out of memory");
	b->io = io;
	b->ns_offset = p->ns_offset;
	b->ns_size = p->ns_size;
	b->readonly = p->readonly;
	b->durability = p->durability;
	b->journal = p->durability == BTT_DUR_GROUP ? p->journal : NULL;
	memcpy(b->boot_id, p->boot_id, 16);
	memcpy(b->uuid, first.uuid, 16);
	b->btt_offset = p->ns_offset + (order[found] == 11 ? BTT_PG_SIZE : 0);
	b->lbasize = first.external_lbasize;
	b->sector_size = data_bytes(first.external_lbasize);
	pthread_mutex_init(&b->elock, NULL);
	pthread_cond_init(&b->econd, NULL);
	pthread_cond_init(&b->tcond, NULL);
	b->cstep = -1;

	rc = discover(b, p, b->btt_offset, &first);
	if (!rc) {
		b->staged = calloc((size_t)b->narenas * BTT_NFREE, sizeof(*b->staged));
		b->cstaged = calloc((size_t)b->narenas * BTT_NFREE, sizeof(*b->cstaged));
		if (!b->staged || !b->cstaged)
			rc = seterr(ENOMEM, "out of memory");
	}
	if (!rc && !b->readonly)
		rc = barrier(b); /* redo writes durable before new writes reuse blocks */
	if (!rc && b->journal) {
		/* A random first epoch: entries left by any earlier run can never match it. */
		if (getrandom(&b->epoch, sizeof(b->epoch), 0) != sizeof(b->epoch))
			b->epoch = (uint64_t)time(NULL) << 20;
		int r = journal_replay(b);
		rc = r < 0 ? r : 0;
		if (!rc && !b->readonly) {
			pthread_mutex_lock(&b->elock);
			rc = commit_locked(b, b->epoch);
			pthread_mutex_unlock(&b->elock);
			if (!rc)
				rc = journal_write_header(b, b->epoch);
		}
	}
	if (rc) {
		free_btt(b);
		return rc;
	}
	*out = b;
	return 0;
}

/* The committer (group mode): commits the filling epoch when a writer has taken half of an
 * arena's lanes (kick), so that the next epoch fills while this one's barriers run, and
 * every timer_ms whatever is staged. */
static void *committer_main(void *arg)
{
	struct btt *b = arg;

	pthread_mutex_lock(&b->elock);
	while (!b->timer_stop) {
		/* Writers signal tcond only to kick: sleeping on econd would wake this thread
		 * on every write (a context switch per request). */
		struct timespec t;
		clock_gettime(CLOCK_REALTIME, &t);
		t.tv_nsec += (long)(b->timer_ms % 1000) * 1000000L;
		t.tv_sec += b->timer_ms / 1000 + t.tv_nsec / 1000000000L;
		t.tv_nsec %= 1000000000L;
		while (!b->timer_stop && !b->kick &&
		       pthread_cond_timedwait(&b->tcond, &b->elock, &t) != ETIMEDOUT)
			;
		b->kick = false;
		if (!b->timer_stop && b->nstaged)
			commit_locked(b, b->epoch);
	}
	pthread_mutex_unlock(&b->elock);
	return NULL;
}

int btt_start_timer(struct btt *b, unsigned interval_ms)
{
	int rc;

	if (b->timer_running || b->readonly || b->durability != BTT_DUR_GROUP)
		return 0;
	b->timer_ms = interval_ms ? interval_ms : 1;
	b->timer_stop = false;
	rc = pthread_create(&b->timer, NULL, committer_main, b);
	if (rc)
		return seterr(rc, "cannot start the commit timer thread");
	b->timer_running = true;
	return 0;
}

int btt_shutdown(struct btt *b)
{
	int rc = 0;

	if (!b || !guard_shut(&b->guard))
		return 0;
	if (b->timer_running) {
		pthread_mutex_lock(&b->elock);
		b->timer_stop = true;
		pthread_cond_broadcast(&b->tcond);
		pthread_mutex_unlock(&b->elock);
		pthread_join(b->timer, NULL);
		b->timer_running = false;
	}
	if (!b->readonly) {
		rc = do_flush(b);
		if (!rc)
			rc = barrier(b); /* the last map writes too: a clean close needs no redo */
	}
	return rc;
}

void btt_free(struct btt *b)
{
	if (b)
		free_btt(b);
}

int btt_close(struct btt *b)
{
	int rc = btt_shutdown(b);
	btt_free(b);
	return rc;
}

/* ---- accessors and tools -------------------------------------------------------------- */

uint64_t btt_nlba(struct btt *b) { return b->nlba; }
uint32_t btt_sector_size(struct btt *b) { return b->sector_size; }
uint32_t btt_lbasize(struct btt *b) { return b->lbasize; }
int btt_narenas(struct btt *b) { return b->narenas; }

int btt_arena_info(struct btt *b, int i, struct btt_info *info, struct btt_arena_layout *lay)
{
	if (i < 0 || i >= b->narenas)
		return -EINVAL;
	*info = b->arenas[i].info;
	*lay = b->arenas[i].lay;
	return 0;
}

int btt_flog_scheme(struct btt *b, int i, int *idx0, int *idx1)
{
	if (i < 0 || i >= b->narenas)
		return -EINVAL;
	*idx0 = b->arenas[i].log_index[0];
	*idx1 = b->arenas[i].log_index[1];
	return 0;
}

void btt_get_stats(struct btt *b, struct btt_stats *s)
{
	s->writes = __atomic_load_n(&b->stats.writes, __ATOMIC_RELAXED);
	s->commits = __atomic_load_n(&b->stats.commits, __ATOMIC_RELAXED);
	s->syncs = __atomic_load_n(&b->stats.syncs, __ATOMIC_RELAXED);
	s->journal_replayed = __atomic_load_n(&b->stats.journal_replayed, __ATOMIC_RELAXED);
	s->redo_applied = __atomic_load_n(&b->stats.redo_applied, __ATOMIC_RELAXED);
	s->map_reads = __atomic_load_n(&b->stats.map_reads, __ATOMIC_RELAXED);
	s->hole_reads = __atomic_load_n(&b->stats.hole_reads, __ATOMIC_RELAXED);
	s->data_reads = __atomic_load_n(&b->stats.data_reads, __ATOMIC_RELAXED);
}

struct lane *lane_view(struct arena *a, uint32_t i, uint32_t *free_block)
{
	struct lane *ln = &a->lanes[i];
	*free_block = ln->state == LANE_STAGED ? (ln->st_old & BTT_MAP_MASK) : ln->block;
	return ln;
}

int btt_debug_set_map_flags(struct btt *b, uint64_t lba, uint32_t flags)
{
	uint32_t premap, entry;
	struct arena *a;
	int rc = check_range(b, lba, 1);

	if (rc)
		return rc;
	rc = btt_flush(b);
	if (rc)
		return rc;
	a = arena_of(b, lba, &premap);
	pthread_mutex_lock(stripe_of(a, premap));
	rc = arena_map_read(b, a, premap, &entry);
	if (!rc)
		rc = arena_map_write(b, a, premap,
				     (flags & (BTT_MAP_Z | BTT_MAP_E)) | map_resolve(entry, premap));
	pthread_mutex_unlock(stripe_of(a, premap));
	return rc;
}

void btt_debug_hold_rtt(struct btt *b, uint32_t count)
{
	for (int i = 0; i < b->narenas; i++)
		for (uint32_t k = 0; k < b->arenas[i].lay.nfree; k++)
			atomic_store(&b->arenas[i].rtt[k], k < count ? RTT_PENDING : 0);
}

int btt_debug_commit_step(struct btt *b)
{
	int rc = 0;

	pthread_mutex_lock(&b->elock);
	if (b->cstep < 0) {
		if (!b->committing && !b->failed && !b->readonly && !b->inflight && b->nstaged) {
			commit_begin(b);
			b->cstep = 0;
		}
	} else {
		rc = commit_step(b, b->cstep++);
		if (rc || b->cstep == C_STEPS) {
			b->cstep = -1;
			rc = commit_end(b, rc);
		}
	}
	if (!rc)
		rc = b->cstep >= 0;
	pthread_mutex_unlock(&b->elock);
	return rc;
}
