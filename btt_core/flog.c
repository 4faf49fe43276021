/*
 * flog.c - the free-list log (btt-format.md §6): a lane's four slots, the two live ones
 * (the slot scheme) and which entry of a pair is the newer.
 */
#include "btt_int.h"

const uint32_t seq_next[4] = {0, 2, 3, 1};

void flog_slot_get(const uint8_t *group, int slot, struct flog_entry *e)
{
	const uint8_t *s = group + slot * 16;
	e->lba = get32(s), e->old_map = get32(s + 4), e->new_map = get32(s + 8), e->seq = get32(s + 12);
}

void flog_slot_put(uint8_t *group, int slot, const struct flog_entry *e)
{
	uint8_t *s = group + slot * 16;
	put32(s, e->lba), put32(s + 4, e->old_map), put32(s + 8, e->new_map), put32(s + 12, e->seq);
}

/* Which two of a lane's four slots are live: (0,1) since Linux 4.15, (0,2) before (§6.3). */
int flog_detect_scheme(const uint8_t *flog, uint32_t nfree, int aidx, int idx[2])
{
	unsigned used = 0;

	for (uint32_t i = 0; i < nfree; i++) {
		unsigned mask = 0;
		for (int s = 0; s < 4; s++)
			if (!is_zero(flog + (size_t)i * BTT_LOG_GROUP + s * 16, 16))
				mask |= 1u << s;
		if (!(mask & 1))
			return seterr(EUCLEAN, "arena %d lane %u: flog slot 0 is empty (never initialised)",
				      aidx, i);
		used |= mask;
	}
	idx[0] = 0;
	if (used == 0x1 || used == 0x3)
		idx[1] = 1;
	else if (used == 0x5)
		idx[1] = 2;
	else
		return seterr(EUCLEAN, "arena %d: unknown flog padding scheme (live slots mask 0x%x)",
			      aidx, used);
	return 0;
}

/* The newer of a lane's two live entries (§6.4); -1 when their sequence numbers conflict. */
int flog_newest(const struct flog_entry *e0, const struct flog_entry *e1)
{
	uint32_t a = e0->seq, b = e1->seq;

	if (a > 3 || b > 3 || a == b)
		return -1;
	if (a == 0)
		return 1;
	if (b == 0)
		return 0;
	return seq_next[a] == b ? 1 : 0;
}
