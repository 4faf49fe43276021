/*
 * write.c - the write path, in the order a write happens (btt-format.md §7.3, with the
 * flog and map writes deferred to a group commit; docs/engine.md, "Durability").
 *
 * How a write becomes durable here (every mode uses the same steps; they differ in when
 * a commit runs and whether barriers are real fdatasyncs):
 *
 *   reserve   take a clean lane; its free block F receives the data
 *   data      pwrite the sector into F                         (no lock held)
 *   publish   stage {lba, old, F, seq}; readers now see F; append to the intent journal
 *   commit    barrier -> flog entries -> barrier -> map entries; lanes advance to their
 *             old blocks, which only now become reusable                    (commit.c)
 *
 * Within one epoch (the writes between two commits) a lane is used at most once and an
 * LBA is staged at most once, so any subset of the flog and map writes that reach the
 * media is repaired by the kernel's own load-time recovery (§6.5). group mode commits on
 * FLUSH, FUA, a full epoch, an LBA conflict and a timer; strict and none commit at the end
 * of every write request (strict with fdatasync, none without).
 */
#include "btt_int.h"

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
		    !MUTATED(REWRITE_DURING_COMMIT)) {
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

void unreserve_lane(struct btt *b, struct arena *a, uint32_t lane, uint32_t premap)
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

/* Publishes the staged entry of a reserved lane whose data is written (elock held). */
int stage_entry(struct btt *b, struct arena *a, uint32_t lane, uint32_t premap,
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
	if (MUTATED(REUSE_BEFORE_COMMIT)) {
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
			 journal_append(b, (uint32_t)(a - b->arenas), lane, premap, block, seq, crc,
					 a->lanes[lane].st_old))
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

int do_write(struct btt *b, uint64_t lba, uint64_t count, const void *buf, int flags)
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

int do_set_zero(struct btt *b, uint64_t lba, uint64_t count, int flags)
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
