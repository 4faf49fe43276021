/*
 * check.c - consistency checks over an open BTT.
 *
 * The bitmap rule (ndctl's btt check, btt-format.md §6.5): in every arena each internal
 * block is referenced exactly once, either by a map entry (identity entries reference
 * their own LBA's block) or as some lane's free block. A block referenced twice means
 * two LBAs share data or a write will overwrite live data; an unreferenced block is lost
 * capacity. Staged (uncommitted) writes are part of the view, as readers see them.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "btt_int.h"

struct report {
	char *buf;
	size_t len, used;
};

static void note(struct report *r, const char *fmt, ...)
{
	va_list ap;
	int n;

	if (!r->buf || r->used + 1 >= r->len)
		return;
	va_start(ap, fmt);
	n = vsnprintf(r->buf + r->used, r->len - r->used, fmt, ap);
	va_end(ap);
	if (n > 0)
		r->used = r->used + (size_t)n < r->len ? r->used + (size_t)n : r->len - 1;
}

/* Marks block as referenced; counts and describes what is wrong with the reference. */
static void mark(uint8_t *bits, const struct arena *a, int aidx, uint32_t block, const char *who,
		 uint64_t id, struct btt_check_result *res, struct report *rep)
{
	if (block >= a->lay.internal_nlba) {
		res->out_of_range++;
		note(rep, "arena %d: %s %llu points to block %u beyond the %u data blocks\n", aidx, who,
		     (unsigned long long)id, block, a->lay.internal_nlba);
		return;
	}
	if (bits[block / 8] & (1u << (block % 8))) {
		res->duplicates++;
		note(rep, "arena %d: block %u is referenced again by %s %llu\n", aidx, block, who,
		     (unsigned long long)id);
		return;
	}
	bits[block / 8] |= (uint8_t)(1u << (block % 8));
}

static int check_arena(struct btt *b, struct arena *a, int aidx, struct btt_check_result *res,
		       struct report *rep)
{
	enum { CHUNK = 65536 };
	uint32_t nblocks = a->lay.internal_nlba, nlba = a->lay.external_nlba;
	uint8_t *bits = calloc((size_t)nblocks / 8 + 1, 1);
	uint8_t *raw = malloc((size_t)CHUNK * 4);
	uint64_t referenced = 0;
	int rc = 0;

	if (!bits || !raw) {
		free(bits);
		free(raw);
		return seterr(ENOMEM, "out of memory for the check bitmap");
	}
	for (uint32_t p0 = 0; p0 < nlba && !rc; p0 += CHUNK) {
		uint32_t n = nlba - p0 < CHUNK ? nlba - p0 : CHUNK;
		rc = b->io->ops->read(b->io, raw, (size_t)n * 4,
				      a->base + a->lay.mapoff + (uint64_t)p0 * 4);
		for (uint32_t i = 0; i < n && !rc; i++) {
			uint32_t p = p0 + i, entry = (uint32_t)raw[4 * i] | (uint32_t)raw[4 * i + 1] << 8 |
						     (uint32_t)raw[4 * i + 2] << 16 |
						     (uint32_t)raw[4 * i + 3] << 24;
			staged_lookup(a, p, &entry);
			if ((entry & (BTT_MAP_Z | BTT_MAP_E)) == BTT_MAP_E)
				res->error_entries++;
			if ((entry & (BTT_MAP_Z | BTT_MAP_E)) == BTT_MAP_Z)
				res->zero_entries++;
			mark(bits, a, aidx, map_resolve(entry, p), "LBA", a->lay.lba_start + p, res, rep);
		}
	}
	for (uint32_t i = 0; i < a->lay.nfree && !rc; i++) {
		uint32_t block;
		lane_view(a, i, &block);
		mark(bits, a, aidx, block, "free list of lane", i, res, rep);
	}
	if (!rc) {
		for (uint32_t k = 0; k < nblocks; k++)
			referenced += (bits[k / 8] >> (k % 8)) & 1;
		res->blocks += nblocks;
		if (referenced < nblocks) {
			res->unreferenced += nblocks - referenced;
			note(rep, "arena %d: %llu of %u blocks are referenced by neither map nor free list\n",
			     aidx, (unsigned long long)(nblocks - referenced), nblocks);
		}
	}
	free(bits);
	free(raw);
	return rc;
}

int btt_check(struct btt *b, struct btt_check_result *res, char *msgbuf, size_t msglen)
{
	struct report rep = {msgbuf, msglen, 0};
	int rc = 0;

	memset(res, 0, sizeof(*res));
	if (msgbuf && msglen)
		msgbuf[0] = 0;
	/* The epoch lock keeps staging and commits still while the map is scanned. */
	pthread_mutex_lock(&b->elock);
	while (b->inflight)
		pthread_cond_wait(&b->econd, &b->elock);
	for (int i = 0; i < b->narenas && !rc; i++)
		rc = check_arena(b, &b->arenas[i], i, res, &rep);
	pthread_mutex_unlock(&b->elock);
	return rc;
}
