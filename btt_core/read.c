/*
 * read.c - the read path (btt-format.md §7.2) and the read tracking table (§7.1) that keeps
 * writers from reusing a block a reader is still copying.
 */
#include <string.h>

#include "btt_int.h"

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
void rtt_wait(struct arena *a, uint32_t block)
{
	if (atomic_load(&a->readers) == 0 || MUTATED(NO_RTT_WAIT))
		return;
	for (uint32_t i = 0; i < a->lay.nfree; i++)
		while (rtt_covers(atomic_load(&a->rtt[i]), block))
			sched_yield();
}

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

int do_read(struct btt *b, uint64_t lba, uint64_t count, void *buf)
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
