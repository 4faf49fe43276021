/*
 * journal.c - the intent journal of group mode (docs/engine.md, "Durability"): appended to
 * as writes are staged (write.c) and retired by each commit (commit.c); open.c replays it
 * after a process crash.
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

/* One region holds an epoch: at most one entry per lane. */
uint64_t journal_region(const struct btt *b, uint64_t epoch)
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
		   uint32_t block, uint32_t seq, uint32_t data_crc, uint32_t old)
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
	put32(e + 44, old & BTT_MAP_MASK);
	put32(e + 4, btt_crc32c(0, e, J_ENTRY));
	return b->journal->ops->write(b->journal, e, J_ENTRY, journal_region(b, b->epoch) +
				      (uint64_t)b->journal_next++ * J_ENTRY);
}
