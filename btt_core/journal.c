/*
 * journal.c - the intent journal of group mode (docs/engine.md, "Durability"): appended to
 * as writes are staged, retired by each commit, replayed at open after a process crash.
 */
#include <stdlib.h>
#include <string.h>

#include "btt_int.h"

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
int journal_write_header(struct btt *b, uint64_t oldest)
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

int journal_append(struct btt *b, uint32_t aidx, uint32_t lane, uint32_t premap,
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
 * lanes and LBAs the other's do not (write.c), so the two epochs are
 * replayed as one, oldest first. */
int journal_replay(struct btt *b)
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
	b->epoch = oldest + 2; /* entries replayed now are committed before any new epoch */
	return replayed;
}
