/*
 * extents.c - block status (NBD's base:allocation): what ranges of a BTT read as zeros,
 * from the map's Z flags, identity entries over holes and the staged writes.
 */
#include <stdlib.h>

#include "btt_int.h"

/*
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

int do_block_status(struct btt *b, uint64_t off, uint64_t len, struct btt_extent *out,
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
