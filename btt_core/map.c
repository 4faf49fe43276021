/*
 * map.c - the map (btt-format.md §5) as the I/O path sees it: which arena and map entry an
 * LBA has, the per-arena cache of map pages, the holes of a sparse file, and the staged
 * map words of writes not yet committed.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <stdlib.h>
#include <string.h>

#include "btt_int.h"

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

#define MAP_CACHE_MAX 1024u /* pages per arena (4 MiB): a 1 GiB namespace's whole map is 256 */

uint64_t map_off(const struct arena *a, uint32_t premap)
{
	return a->base + a->lay.mapoff + (uint64_t)premap * 4;
}

uint64_t block_off(const struct arena *a, uint32_t block)
{
	return a->base + a->lay.dataoff + (uint64_t)block * a->lay.internal_lbasize;
}

int map_cache_init(struct arena *a)
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

void map_cache_free(struct arena *a)
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

bool hole_bit(_Atomic uint64_t *bits, uint64_t u)
{
	return atomic_load_explicit(&bits[u / 64], memory_order_relaxed) >> (u % 64) & 1;
}

static void hole_ends(_Atomic uint64_t *bits, uint64_t u)
{
	if (hole_bit(bits, u))
		atomic_fetch_and(&bits[u / 64], ~(1ull << (u % 64)));
}

/* Units wholly inside the data area: a last partial one counts as data, and has no bit. */
uint64_t data_hole_units(const struct arena *a)
{
	return (uint64_t)a->lay.internal_nlba * a->lay.internal_lbasize / DATA_HOLE_UNIT;
}

int holes_init(struct btt *b, struct arena *a)
{
	uint32_t map_pages = (a->lay.external_nlba + MAP_PAGE_WORDS - 1) / MAP_PAGE_WORDS;
	int rc = holes_find(b->io, map_off(a, 0), BTT_PG_SIZE, map_pages, &a->map_hole);

	if (!rc)
		rc = holes_find(b->io, block_off(a, 0), DATA_HOLE_UNIT, data_hole_units(a),
				&a->data_hole);
	return rc;
}

bool map_page_is_hole(struct arena *a, uint32_t page)
{
	return hole_bit(a->map_hole, page);
}

/* Before page `page` is written (its slot lock held). */
void map_page_written(struct arena *a, uint32_t page)
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

bool block_is_hole(const struct arena *a, uint32_t block)
{
	uint64_t first, last;

	block_units(a, block, &first, &last);
	return last < data_hole_units(a) && hole_bit(a->data_hole, first) &&
	       hole_bit(a->data_hole, last);
}

/* Before any write to data block `block` is issued. A reader that resolved a block in the
 * same unit may still find the bit set: its own block was not written, so zeros are right;
 * a reader of this block resolves it through the map, after the write. */
void block_written(struct arena *a, uint32_t block)
{
	uint64_t first, last;

	block_units(a, block, &first, &last);
	for (uint64_t u = first; u <= last && u < data_hole_units(a); u++)
		hole_ends(a->data_hole, u);
}

struct map_page *map_slot(struct arena *a, uint32_t page)
{
	return &a->mcache[page & (a->mc_slots - 1)];
}

/* With slot s locked: whether it holds map page `page`, which it then does exactly as
 * on the media. An empty slot is filled (one read, straight into the slot); a slot that
 * holds another page keeps it. Evicting on every miss cost more than it saved once the
 * map outgrows the cache (a 1 TiB namespace has 262,144 map pages per 1,024 slots, and
 * its random reads through NBD fell from 0.96-1.10x to 0.72-0.87x the 1 GiB figure),
 * while the pages first touched are all that a namespace up to 4 GiB (4k sectors) has. */
int map_cached_locked(struct btt *b, struct arena *a, struct map_page *s, uint32_t page,
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
int map_get(struct btt *b, struct arena *a, uint32_t premap, uint32_t n, uint32_t *out)
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
int map_put(struct btt *b, struct arena *a, uint32_t premap, uint32_t n, const uint32_t *words)
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

int arena_map_write(struct btt *b, struct arena *a, uint32_t premap, uint32_t entry)
{
	return map_put(b, a, premap, 1, &entry);
}

pthread_mutex_t *stripe_of(struct arena *a, uint32_t premap)
{
	return &a->stripes[(premap >> 4) % NSTRIPES];
}

static uint32_t stage_hash(uint32_t premap)
{
	return (premap * 0x9E3779B1u) >> 22; /* 10 bits: STAGE_SLOTS */
}

int stage_find(struct arena *a, int t, uint32_t premap)
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

void stage_insert(struct arena *a, int t, uint32_t premap, uint64_t keyflags, uint32_t word)
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

void stage_set(struct arena *a, int t, int i, uint32_t premap, uint64_t keyflags,
	       uint32_t word)
{
	atomic_store(&a->stage[t][i], ((uint64_t)premap + 1 + keyflags) << 32 | word);
}

/* Empties a table after its epoch's commit. Only the slots taken since the last reset are
 * cleared: a commit per write (strict, none) spent a tenth of its CPU time clearing all
 * 1024 when one was used. */
void stage_reset(struct arena *a, int t)
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

struct arena *arena_of(struct btt *b, uint64_t lba, uint32_t *premap)
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

int check_range(struct btt *b, uint64_t lba, uint64_t count)
{
	if (lba > b->nlba || count > b->nlba - lba)
		return seterr(EINVAL, "sectors [%llu, +%llu) are beyond the %llu sectors of the BTT",
			      (unsigned long long)lba, (unsigned long long)count,
			      (unsigned long long)b->nlba);
	return 0;
}
