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
	if ((rc = guard_enter(&b->guard)))
		return rc;
	/* The epoch lock keeps staging and commits still while the map is scanned. */
	pthread_mutex_lock(&b->elock);
	quiesce_locked(b);
	for (int i = 0; i < b->narenas && !rc; i++)
		rc = check_arena(b, &b->arenas[i], i, res, &rep);
	pthread_mutex_unlock(&b->elock);
	guard_leave(&b->guard);
	return rc;
}

/* ---- offline check and repair (check-namespace) ----------------------------------- */

/*
 * Unlike btt_open, which refuses damaged metadata, this walks whatever is on the media and
 * reports each problem on its own line: "severity<TAB>arena<TAB>code<TAB>repaired<TAB>text".
 * Repairs are the ones that cannot lose data: a primary info block restored from its
 * backup (or the other way round), an interrupted write's map entry redone, and, when
 * asked, every lane's log regenerated in the (0,1) scheme. Bitmap damage is only reported.
 */
struct offline {
	struct btt_io *io;
	const struct btt_check_opts *o;
	struct report rep;
	struct btt_check_summary *sum;
	uint64_t base;    /* absolute offset of the BTT start */
	uint64_t rawsize; /* BTT bytes */
};

static void finding(struct offline *c, int error, int arena, const char *code, int repaired,
		    const char *fmt, ...) __attribute__((format(printf, 6, 7)));

static void finding(struct offline *c, int error, int arena, const char *code, int repaired,
		    const char *fmt, ...)
{
	char text[600];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(text, sizeof(text), fmt, ap);
	va_end(ap);
	note(&c->rep, "%s\t%d\t%s\t%d\t%s\n", error ? "error" : "note", arena, code, repaired, text);
	if (error) {
		c->sum->errors++;
		if (repaired)
			c->sum->repaired++;
	}
}

static int raw_write(struct offline *c, const void *buf, size_t len, uint64_t off)
{
	int rc = c->io->ops->write(c->io, buf, len, off);
	return rc ? rc : c->io->ops->sync(c->io);
}

/* Where ndctl looks for an arena's backup info block when the primary is unusable. */
static int backup_candidates(uint64_t remaining, uint64_t out[2])
{
	int n = 0;

	if (remaining >= BTT_ARENA_MAX + BTT_ARENA_MIN)
		out[n++] = BTT_ARENA_MAX - BTT_INFO_SIZE;
	if (remaining >= BTT_ARENA_MIN)
		out[n++] = (remaining > BTT_ARENA_MAX ? BTT_ARENA_MAX : remaining) / BTT_PG_SIZE *
			   BTT_PG_SIZE - BTT_INFO_SIZE;
	return n;
}

/* The arena's primary info block, restored from the backup when it is damaged.
 * Returns 0 with *ib filled, or -ENODEV when neither copy is usable. */
static int arena_info(struct offline *c, int idx, uint64_t start, int want_version,
		      struct btt_info *ib, uint8_t raw[BTT_INFO_SIZE])
{
	static const struct btt_open_params noparent;
	uint64_t cand[2];
	char why[512];
	int n, rc;

	rc = read_info(c->io, c->base + start, &noparent, ib);
	if (!rc && (!want_version || ib->version_major * 10 + ib->version_minor == want_version))
		return c->io->ops->read(c->io, raw, BTT_INFO_SIZE, c->base + start);
	snprintf(why, sizeof(why), "%s", rc ? btt_errmsg() : "wrong version");
	n = backup_candidates(c->rawsize - start, cand);
	for (int k = 0; k < n; k++) {
		if (read_info(c->io, c->base + start + cand[k], &noparent, ib) || ib->info2off != cand[k] ||
		    (want_version && ib->version_major * 10 + ib->version_minor != want_version))
			continue;
		rc = c->io->ops->read(c->io, raw, BTT_INFO_SIZE, c->base + start + cand[k]);
		if (rc)
			return rc;
		if (c->o->repair && (rc = raw_write(c, raw, BTT_INFO_SIZE, c->base + start)))
			return rc;
		finding(c, 1, idx, "info-primary", c->o->repair,
			"primary info block is damaged (%s); the backup at arena offset %llu is valid%s",
			why, (unsigned long long)cand[k], c->o->repair ? " and was copied over it" : "");
		return 0;
	}
	return seterr(ENODEV, "%s; no valid backup info block either", why);
}

static void progress(struct offline *c, int arena, uint64_t done, uint64_t total)
{
	if (c->o->progress)
		c->o->progress(c->o->ctx, arena, done, total);
}

/* Flog, interrupted writes, map ranges and the bitmap rule of one arena. */
static int check_arena_offline(struct offline *c, int idx, uint64_t abase,
			       const struct btt_arena_layout *l)
{
	enum { CHUNK = 65536 };
	size_t flogsize = (size_t)l->nfree * BTT_LOG_GROUP;
	uint8_t *flog = malloc(flogsize), *raw = malloc((size_t)CHUNK * 4);
	uint8_t *bits = calloc((size_t)l->internal_nlba / 8 + 1, 1);
	uint32_t *redo_lba = calloc(l->nfree, sizeof(uint32_t)), *redo_new = calloc(l->nfree, 4);
	struct flog_entry *newest = calloc(l->nfree, sizeof(*newest));
	int idxs[2], nredo = 0, flog_ok = 1, rc;
	uint64_t bad_map = 0, dups = 0, referenced = 0, errs = 0, flagged = 0;

	if (!flog || !raw || !bits || !redo_lba || !redo_new || !newest) {
		rc = seterr(ENOMEM, "out of memory");
		goto out;
	}
	rc = c->io->ops->read(c->io, flog, flogsize, abase + l->logoff);
	if (rc)
		goto out;
	if (flog_detect_scheme(flog, l->nfree, idx, idxs)) {
		finding(c, 1, idx, "flog-scheme", 0, "%s", btt_errmsg());
		flog_ok = 0;
	} else if (idxs[1] == 2) {
		finding(c, 0, idx, "flog-old-padding", 0, "the log uses the pre-4.15 (0,2) slot scheme%s",
			c->o->rewrite_log ? "" : "; --rewrite-log converts it");
	}
	for (uint32_t i = 0; flog_ok && i < l->nfree; i++) {
		struct flog_entry e[2];
		int w;
		flog_slot_get(flog + (size_t)i * BTT_LOG_GROUP, idxs[0], &e[0]);
		flog_slot_get(flog + (size_t)i * BTT_LOG_GROUP, idxs[1], &e[1]);
		w = flog_newest(&e[0], &e[1]);
		if (w < 0) {
			finding(c, 1, idx, "flog-seq", 0, "lane %u: sequence numbers %u and %u conflict", i,
				e[0].seq, e[1].seq);
			flog_ok = 0;
			break;
		}
		newest[i] = e[w];
		if ((e[w].old_map | e[w].new_map) & BTT_MAP_Z)
			flagged++;
		if (e[w].lba >= l->external_nlba || (e[w].old_map & BTT_MAP_MASK) >= l->internal_nlba ||
		    (e[w].new_map & BTT_MAP_MASK) >= l->internal_nlba) {
			finding(c, 1, idx, "flog-range", 0, "lane %u: entry {lba %u, old %u, new %u} points "
				"outside the arena", i, e[w].lba, e[w].old_map & BTT_MAP_MASK,
				e[w].new_map & BTT_MAP_MASK);
			flog_ok = 0;
		}
	}
	if (flagged)
		finding(c, 0, idx, "flog-flags", 0, "%llu lanes carry PMDK-style flag bits in their log "
			"entries (masked when read)", (unsigned long long)flagged);

	/* Interrupted writes: the newest entry is committed but the map still names old. */
	for (uint32_t i = 0; flog_ok && i < l->nfree; i++) {
		uint32_t old = newest[i].old_map & BTT_MAP_MASK, new = newest[i].new_map & BTT_MAP_MASK;
		uint8_t m[4];
		if (old == new)
			continue;
		rc = c->io->ops->read(c->io, m, 4, abase + l->mapoff + (uint64_t)newest[i].lba * 4);
		if (rc)
			goto out;
		if (map_resolve(get32(m), newest[i].lba) != old)
			continue;
		redo_lba[nredo] = newest[i].lba, redo_new[nredo++] = new;
		if (c->o->repair) {
			put32(m, BTT_MAP_NORMAL | new);
			rc = raw_write(c, m, 4, abase + l->mapoff + (uint64_t)newest[i].lba * 4);
			if (rc)
				goto out;
		}
		finding(c, 1, idx, "interrupted-write", c->o->repair, "LBA %llu: the log names block %u "
			"but the map still has %u (a write interrupted between log and map)%s",
			(unsigned long long)(l->lba_start + newest[i].lba), new, old,
			c->o->repair ? "; map updated" : "");
	}

	/* The bitmap rule, seeing the map as recovery would leave it. */
	for (uint32_t p0 = 0; p0 < l->external_nlba; p0 += CHUNK) {
		uint32_t n = l->external_nlba - p0 < CHUNK ? l->external_nlba - p0 : CHUNK;
		rc = c->io->ops->read(c->io, raw, (size_t)n * 4, abase + l->mapoff + (uint64_t)p0 * 4);
		if (rc)
			goto out;
		for (uint32_t i = 0; i < n; i++) {
			uint32_t p = p0 + i, entry = get32(raw + 4 * i), block;
			for (int k = 0; k < nredo; k++)
				if (redo_lba[k] == p)
					entry = BTT_MAP_NORMAL | redo_new[k];
			block = map_resolve(entry, p);
			if ((entry & (BTT_MAP_Z | BTT_MAP_E)) == BTT_MAP_E)
				errs++;
			if (block >= l->internal_nlba) {
				if (bad_map++ < 5)
					finding(c, 1, idx, "map-range", 0, "LBA %llu: map entry 0x%08x points "
						"beyond the %u data blocks", (unsigned long long)(l->lba_start + p),
						entry, l->internal_nlba);
			} else if (bits[block / 8] & (1u << (block % 8))) {
				if (dups++ < 5)
					finding(c, 1, idx, "bitmap-duplicate", 0, "block %u is mapped again by "
						"LBA %llu", block, (unsigned long long)(l->lba_start + p));
			} else {
				bits[block / 8] |= (uint8_t)(1u << (block % 8));
			}
		}
		progress(c, idx, p0 + n, l->external_nlba);
	}
	if (bad_map > 5)
		finding(c, 1, idx, "map-range", 0, "%llu more map entries out of range",
			(unsigned long long)(bad_map - 5));
	if (dups > 5)
		finding(c, 1, idx, "bitmap-duplicate", 0, "%llu more blocks mapped twice",
			(unsigned long long)(dups - 5));
	if (errs)
		finding(c, 0, idx, "media-error", 0, "%llu sectors are marked as media errors (they read "
			"EIO until rewritten)", (unsigned long long)errs);
	for (uint32_t i = 0; flog_ok && i < l->nfree; i++) {
		uint32_t block = newest[i].old_map & BTT_MAP_MASK;
		if (bits[block / 8] & (1u << (block % 8))) {
			finding(c, 1, idx, "bitmap-duplicate", 0, "lane %u's free block %u is also in use",
				i, block);
			dups++;
		}
		bits[block / 8] |= (uint8_t)(1u << (block % 8));
	}
	if (flog_ok) {
		for (uint32_t k = 0; k < l->internal_nlba; k++)
			referenced += (bits[k / 8] >> (k % 8)) & 1;
		if (referenced < l->internal_nlba)
			finding(c, 1, idx, "bitmap-unreferenced", 0, "%llu of %u blocks are referenced by "
				"neither map nor free list", (unsigned long long)(l->internal_nlba - referenced),
				l->internal_nlba);
	}

	/* --rewrite-log: one entry per lane, in slot 0 with seq 1, the rest zero (§6.5). Each
	 * lane's 64-byte group is one write inside one sector, and a lane holding only slot 0
	 * reads the same under either scheme, so a crash midway leaves a valid log. */
	if (flog_ok && c->o->repair && c->o->rewrite_log) {
		for (uint32_t i = 0; i < l->nfree; i++) {
			uint8_t group[BTT_LOG_GROUP] = {0};
			struct flog_entry e = newest[i];
			uint32_t oflags = (e.old_map & (BTT_MAP_Z | BTT_MAP_E)) == BTT_MAP_E ? BTT_MAP_E : 0;
			e.old_map = (e.old_map & BTT_MAP_MASK) | oflags;
			e.new_map &= BTT_MAP_MASK;
			e.seq = 1;
			flog_slot_put(group, 0, &e);
			rc = c->io->ops->write(c->io, group, sizeof(group), abase + l->logoff + (uint64_t)i * 64);
			if (rc)
				goto out;
		}
		rc = c->io->ops->sync(c->io);
		if (rc)
			goto out;
		finding(c, 0, idx, "flog-rewritten", 0, "the log was regenerated in the (0,1) scheme");
	} else if (!flog_ok && c->o->rewrite_log) {
		finding(c, 0, idx, "flog-not-rewritten", 0, "the log is damaged; it was not regenerated");
	}
	rc = 0;
out:
	free(flog);
	free(raw);
	free(bits);
	free(redo_lba);
	free(redo_new);
	free(newest);
	return rc;
}

int btt_check_offline(struct btt_io *io, const struct btt_check_opts *o,
		      struct btt_check_summary *sum, char *report, size_t len)
{
	struct offline c = {io, o, {report, len, 0}, sum, 0, 0};
	static const int order_auto[] = {11, 20}, order_11[] = {11}, order_20[] = {20};
	const int *order = o->version == 11 ? order_11 : o->version == 20 ? order_20 : order_auto;
	int norder = o->version ? 1 : 2, rc = -ENODEV;
	uint8_t raw[BTT_INFO_SIZE], first_raw[BTT_INFO_SIZE];
	struct btt_info ib, first;
	char why[2][300] = {"", ""};
	uint64_t start = 0;

	memset(sum, 0, sizeof(*sum));
	if (report && len)
		report[0] = 0;
	if (o->ns_offset + o->ns_size < o->ns_offset || io->ops->size(io) < o->ns_offset + o->ns_size)
		return seterr(EINVAL, "namespace [%llu, +%llu) lies beyond the end of the backing store",
			      (unsigned long long)o->ns_offset, (unsigned long long)o->ns_size);
	for (int k = 0; k < norder && rc; k++) {
		uint64_t initial = order[k] == 11 ? BTT_PG_SIZE : 0;
		if (o->ns_size < initial + BTT_ARENA_MIN) {
			snprintf(why[k], sizeof(why[k]), "too small for BTT %d.%d", order[k] / 10, order[k] % 10);
			continue;
		}
		c.base = o->ns_offset + initial;
		c.rawsize = o->ns_size - initial;
		rc = arena_info(&c, 0, 0, order[k], &first, first_raw);
		if (rc == -ENODEV)
			snprintf(why[k], sizeof(why[k]), "BTT %d.%d: %s", order[k] / 10, order[k] % 10,
				 btt_errmsg());
		else if (rc)
			return rc;
	}
	if (rc)
		return seterr(ENODEV, "no BTT found: %s%s%s", why[0], norder > 1 ? "; " : "", why[1]);
	sum->found = 1;
	sum->version = first.version_major * 10 + first.version_minor;
	sum->lbasize = first.external_lbasize;

	for (int idx = 0;; idx++) {
		struct btt_arena_layout lay;
		uint8_t backup[BTT_INFO_SIZE];

		if (idx == 0) {
			ib = first;
			memcpy(raw, first_raw, sizeof(raw));
		} else if (arena_info(&c, idx, start, 0, &ib, raw)) {
			finding(&c, 1, idx, "info-primary", 0, "%s: the arena chain ends here", btt_errmsg());
			break;
		}
		if (validate_arena(&ib, idx, start, c.rawsize, idx ? &first : NULL, &lay)) {
			finding(&c, 1, idx, "info-fields", 0, "%s", btt_errmsg());
			break;
		}
		sum->narenas++;
		rc = io->ops->read(io, backup, sizeof(backup), c.base + start + lay.info2off);
		if (rc)
			return rc;
		if (memcmp(backup, raw, sizeof(raw))) {
			if (o->repair && (rc = raw_write(&c, raw, sizeof(raw), c.base + start + lay.info2off)))
				return rc;
			finding(&c, 1, idx, "info-backup", o->repair, "backup info block differs from the "
				"primary%s", o->repair ? "; rewritten from the primary" : "");
		}
		lay.lba_start = sum->nlba;
		rc = check_arena_offline(&c, idx, c.base + start, &lay);
		if (rc)
			return rc;
		sum->nlba += lay.external_nlba;
		if (!ib.nextoff)
			break;
		start += ib.nextoff;
		if (start > c.rawsize - BTT_ARENA_MIN) {
			finding(&c, 1, idx, "info-chain", 0, "nextoff leads past the end of the namespace");
			break;
		}
	}
	return 0;
}
