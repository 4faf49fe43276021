/*
 * open.c - opening a BTT: discovery (validating every untrusted info block, btt-format.md
 * §3, §4) and recovery (each lane rebuilt from its flog with the interrupted map write
 * redone, §6.5; then the intent journal replayed, journal.c).
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "btt_int.h"

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
			char why[ERRMSG_MAX];
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

/* Recovery, second part: the writes the intent journal holds (its layout: journal.c). */

/* Replays one epoch's region; returns the number of entries staged, or a negative errno. */
static int journal_replay_epoch(struct btt *b, uint64_t epoch, uint8_t *sector)
{
	uint64_t size = b->journal->ops->size(b->journal), base = journal_region(b, epoch);
	uint8_t e[J_ENTRY];
	int replayed = 0;

	for (uint32_t i = 0; i < (uint32_t)b->narenas * BTT_NFREE; i++) {
		uint64_t off = base + (uint64_t)i * J_ENTRY;
		uint32_t aidx, lane, premap, block, seq, dcrc, old, word, crc;
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
		old = get32(e + 44);
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
		/* ...and only while the map still holds the block the write replaced. A lane's
		 * seq has three values and its blocks cycle, so an entry of a run whose header
		 * rewrite a power cut lost can look like it continues its lane; the map then
		 * moved on (a zero-flag write, a later commit redone from the flog). */
		if (arena_map_read(b, a, premap, &word) || map_resolve(word, premap) != old)
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
 * lanes and LBAs the other's do not (write.c), so the two epochs are
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
	uint64_t last = MUTATED(REPLAY_ONE_EPOCH) ? oldest : oldest + 1;
	for (uint64_t epoch = oldest; epoch <= last && replayed >= 0; epoch++) {
		int r = journal_replay_epoch(b, epoch, sector);
		replayed = r < 0 ? r : replayed + r;
	}
	free(sector);
	if (replayed > 0)
		STAT_ADD(b, journal_replayed, (uint64_t)replayed);
	/* b->epoch stays the random one open drew, not oldest + 2: the header may be older
	 * than the journal (its last rewrite lost to a power cut), and the regions can still
	 * hold entries of epoch oldest + 2 from that run; numbering on from oldest would make
	 * a later replay apply them. Entries replayed now are committed before any new epoch. */
	return replayed;
}

void free_btt(struct btt *b)
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
	char why[2][ERRMSG_MAX] = {"", ""}; /* each holds one btt_errmsg() */
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
	/* The no-journal mutation proves the kill -9 test catches a journal-less server. */
	b->journal = p->durability == BTT_DUR_GROUP && !MUTATED(NO_JOURNAL) ? p->journal : NULL;
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
