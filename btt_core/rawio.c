/*
 * rawio.c - a namespace served raw: its bytes of the region file, with no BTT.
 *
 * Raw exports go through C for the same reason sector exports do: each NBD request is one
 * call with the GIL released, and every call counts itself in, so that shutdown (a forced
 * disable or reconfigure under a connected client) can wait for the calls already running.
 * A write that had started before the disable would otherwise land on the file after it,
 * in bytes that may already belong to the next namespace.
 *
 * Requests must be aligned to the export's block size, as on sector exports: a client
 * tuned on one mode then behaves on the other.
 */
#include <stdlib.h>

#include "btt_int.h"

struct btt_raw {
	struct btt_io *io;  /* owned */
	uint64_t offset;    /* of the namespace in the region file */
	uint64_t size;      /* whole blocks */
	uint32_t block;
	int readonly;
	struct call_guard guard;
};

int btt_raw_open(struct btt_io *io, uint64_t offset, uint64_t size, uint32_t block,
		 int readonly, struct btt_raw **out)
{
	struct btt_raw *r;

	if (block < 512 || block > 65536 || (block & (block - 1)))
		return seterr(EINVAL, "block size %u is not a power of two in 512..65536", block);
	if (offset + size < offset || io->ops->size(io) < offset + size)
		return seterr(EINVAL, "namespace [%llu, +%llu) lies beyond the end of the file",
			      (unsigned long long)offset, (unsigned long long)size);
	r = calloc(1, sizeof(*r));
	if (!r)
		return seterr(ENOMEM, "out of memory");
	r->io = io;
	r->offset = offset;
	r->size = size - size % block;
	r->block = block;
	r->readonly = readonly;
	*out = r;
	return 0;
}

uint64_t btt_raw_size(struct btt_raw *r) { return r->size; }

/* A request nbdkit let through (it refuses those past the end) may still be misaligned. */
static int check_request(struct btt_raw *r, uint64_t off, uint64_t len, int write)
{
	if ((off | len) & (r->block - 1))
		return seterr(EINVAL, "request [%llu, +%llu) is not aligned to %u-byte blocks",
			      (unsigned long long)off, (unsigned long long)len, r->block);
	if (len > BTT_MAX_REQUEST)
		return seterr(EINVAL, "request larger than %u bytes", BTT_MAX_REQUEST);
	if (off > r->size || len > r->size - off)
		return seterr(EINVAL, "request [%llu, +%llu) is beyond the %llu-byte export",
			      (unsigned long long)off, (unsigned long long)len,
			      (unsigned long long)r->size);
	if (write && r->readonly)
		return seterr(EROFS, "the export is read-only");
	return 0;
}

int btt_raw_pread(struct btt_raw *r, void *buf, uint64_t len, uint64_t off)
{
	int rc = guard_enter(&r->guard);

	if (rc)
		return rc;
	rc = check_request(r, off, len, 0);
	if (!rc)
		rc = r->io->ops->read(r->io, buf, len, r->offset + off);
	guard_leave(&r->guard);
	return rc;
}

int btt_raw_pwrite(struct btt_raw *r, const void *buf, uint64_t len, uint64_t off, int flags)
{
	int rc = guard_enter(&r->guard);

	if (rc)
		return rc;
	rc = check_request(r, off, len, 1);
	if (!rc)
		rc = r->io->ops->write(r->io, buf, len, r->offset + off);
	if (!rc && (flags & BTT_FUA))
		rc = r->io->ops->sync(r->io);
	guard_leave(&r->guard);
	return rc;
}

/* Zeroes by punching a hole; with BTT_RAW_ALLOCATE (NBD's NO_HOLE) the hole then gets
 * storage again, so a later write there cannot hit ENOSPC. */
int btt_raw_zero(struct btt_raw *r, uint64_t off, uint64_t len, int flags)
{
	int rc = guard_enter(&r->guard);

	if (rc)
		return rc;
	rc = check_request(r, off, len, 1);
	if (!rc)
		rc = r->io->ops->zero(r->io, r->offset + off, len);
	if (!rc && (flags & BTT_RAW_ALLOCATE))
		rc = r->io->ops->allocate(r->io, r->offset + off, len);
	if (!rc && (flags & BTT_FUA))
		rc = r->io->ops->sync(r->io);
	guard_leave(&r->guard);
	return rc;
}

int btt_raw_flush(struct btt_raw *r)
{
	int rc = guard_enter(&r->guard);

	if (rc)
		return rc;
	if (!r->readonly)
		rc = r->io->ops->sync(r->io);
	guard_leave(&r->guard);
	return rc;
}

/* A file offset the backend answered for a position of this export, as an export offset
 * in [pos, end]: "no more data" (UINT64_MAX) and answers past the request end become end. */
static uint64_t export_pos(const struct btt_raw *r, uint64_t file_off, uint64_t pos, uint64_t end)
{
	uint64_t e = file_off < r->offset + pos ? pos : file_off - r->offset;

	return e < end ? e : end;
}

/* Holes are those of the region file, shrunk to whole blocks of the export: the file
 * system's own block may be smaller than the export's (or the namespace start unaligned
 * to it), and a block partly in a hole is data. Two lseeks per extent at most. */
static void raw_extents(struct btt_raw *r, uint64_t pos, uint64_t end, struct extent_list *l)
{
	struct btt_io *io = r->io;
	uint64_t blk = r->block;

	while (pos < end && !l->full) {
		uint64_t data = export_pos(r, io->ops->next_data(io, r->offset + pos), pos, end);
		uint64_t hole_end = data == end ? end : data / blk * blk, hole, next;

		if (hole_end > pos) {
			extent_add(l, pos, hole_end - pos, BTT_EXTENT_HOLE);
			pos = hole_end;
			continue;
		}
		/* data at pos, or a hole too short for a whole block: data up to the next
		 * hole's first whole block, at least to the end of this block */
		hole = export_pos(r, io->ops->next_hole(io, r->offset + pos), pos, end);
		next = (hole + blk - 1) / blk * blk;
		if (next <= pos)
			next = pos / blk * blk + blk;
		if (next > end)
			next = end;
		extent_add(l, pos, next - pos, 0);
		pos = next;
	}
}

int btt_raw_block_status(struct btt_raw *r, uint64_t off, uint64_t len, struct btt_extent *out,
			 uint32_t max, uint32_t *n)
{
	struct extent_list l = {.v = out, .max = max};
	int rc = guard_enter(&r->guard);

	*n = 0;
	if (rc)
		return rc;
	if (max == 0 || len == 0 || off > r->size || len > r->size - off) {
		rc = seterr(EINVAL, "block status of [%llu, +%llu) in at most %u extents: outside "
			    "the %llu-byte export, or empty", (unsigned long long)off,
			    (unsigned long long)len, max, (unsigned long long)r->size);
	} else {
		raw_extents(r, off, off + len, &l);
		*n = l.n;
	}
	guard_leave(&r->guard);
	return rc;
}

int btt_raw_shutdown(struct btt_raw *r)
{
	if (!r || !guard_shut(&r->guard) || r->readonly)
		return 0;
	return r->io->ops->sync(r->io);
}

void btt_raw_free(struct btt_raw *r)
{
	if (!r)
		return;
	btt_io_destroy(r->io);
	free(r);
}
