/*
 * commit.c - the group commit: the last step of a write (write.c), in the order its I/O
 * happens. barrier -> flog entries -> barrier -> map entries, then the lanes advance to
 * the blocks the epoch freed and the intent journal retires it (btt-format.md §7.3).
 */
#include <stdlib.h>

#include "btt_int.h"

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

	if (MUTATED(REUSE_BEFORE_COMMIT))
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
	static const enum commit_op flush_early[C_STEPS] = {C_BARRIER, C_FLOG, C_NOTHING, C_MAPS};

	return MUTATED(MAP_BEFORE_FLOG) ? map_first :
	       MUTATED(FLOG_BEFORE_DATA_DURABLE) ? flog_early :
	       MUTATED(FLUSH_BEFORE_BARRIER2) ? flush_early : correct;
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
	if (MUTATED(JOURNAL_RETIRED_EARLY) && b->journal)
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
void wait_commit_locked(struct btt *b)
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
int commit_locked(struct btt *b, uint64_t epoch)
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

int do_flush(struct btt *b)
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

#ifdef BTT_MUTATIONS /* test build only (btt_test.h) */
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
#endif
