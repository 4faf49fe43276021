/*
 * btt.c - a BTT's lifecycle and public entry points: the calls servers make (each counts
 * itself in, so shutdown can wait for it), the committer thread, shutdown and close, and
 * the accessors, and the test build's hooks into an open BTT (btt_test.h).
 *
 * The engine's sources, in dependency order (docs/engine.md, "Files"): errmsg.c, then
 * crc32c.c and backend.c (file and memory I/O), flog.c, layout.c, map.c, read.c, journal.c,
 * commit.c, write.c, extents.c, open.c, btt.c; after them check.c (the checker) and rawio.c
 * (namespaces served without a BTT).
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <time.h>

#include "btt_int.h"

#ifdef BTT_MUTATIONS /* the test build's switch (btt_test.h) */
int btt_test_mutation = BTT_MUT_NONE;
#endif

static int byte_range(struct btt *b, uint64_t off, uint64_t len)
{
	if (len > BTT_MAX_REQUEST)
		return seterr(EINVAL, "request of %llu bytes is larger than the %u advertised",
			      (unsigned long long)len, BTT_MAX_REQUEST);
	if (off % b->sector_size || len % b->sector_size)
		return seterr(EINVAL, "request [%llu, +%llu) is not aligned to %u-byte sectors",
			      (unsigned long long)off, (unsigned long long)len, b->sector_size);
	return 0;
}

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
	int rc = byte_range(b, off, len);
	return rc ? rc : btt_read(b, off / b->sector_size, len / b->sector_size, buf);
}

int btt_pwrite(struct btt *b, const void *buf, uint64_t len, uint64_t off, int flags)
{
	int rc = byte_range(b, off, len);
	return rc ? rc : btt_write(b, off / b->sector_size, len / b->sector_size, buf, flags);
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

#ifdef BTT_MUTATIONS /* test build only (btt_test.h) */
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
#endif
