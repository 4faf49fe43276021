/*
 * layout.c - the info block (btt-format.md §3), the arena layout (§4) and formatting a
 * fresh BTT (§4, §6.2).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "btt_int.h"

const uint8_t BTT_SIG[16] = "BTT_ARENA_INFO\0";

uint64_t btt_fletcher64(const void *buf, size_t len)
{
	const uint8_t *p = buf;
	uint32_t lo = 0, hi = 0;

	for (size_t i = 0; i + 4 <= len; i += 4) {
		lo += get32(p + i);
		hi += lo;
	}
	return (uint64_t)hi << 32 | lo;
}

void btt_info_pack(struct btt_info *ib, uint8_t out[4096])
{
	memset(out, 0, BTT_INFO_SIZE);
	memcpy(out + 0x00, ib->signature, 16);
	memcpy(out + 0x10, ib->uuid, 16);
	memcpy(out + 0x20, ib->parent_uuid, 16);
	put32(out + 0x30, ib->flags);
	put16(out + 0x34, ib->version_major);
	put16(out + 0x36, ib->version_minor);
	put32(out + 0x38, ib->external_lbasize);
	put32(out + 0x3C, ib->external_nlba);
	put32(out + 0x40, ib->internal_lbasize);
	put32(out + 0x44, ib->internal_nlba);
	put32(out + 0x48, ib->nfree);
	put32(out + 0x4C, ib->infosize);
	put64(out + 0x50, ib->nextoff);
	put64(out + 0x58, ib->dataoff);
	put64(out + 0x60, ib->mapoff);
	put64(out + 0x68, ib->logoff);
	put64(out + 0x70, ib->info2off);
	ib->checksum = btt_fletcher64(out, BTT_INFO_SIZE);
	put64(out + 0xFF8, ib->checksum);
}

void btt_info_unpack(const uint8_t in[4096], struct btt_info *ib, int *checksum_ok)
{
	uint8_t copy[BTT_INFO_SIZE];

	memcpy(ib->signature, in + 0x00, 16);
	memcpy(ib->uuid, in + 0x10, 16);
	memcpy(ib->parent_uuid, in + 0x20, 16);
	ib->flags = get32(in + 0x30);
	ib->version_major = get16(in + 0x34);
	ib->version_minor = get16(in + 0x36);
	ib->external_lbasize = get32(in + 0x38);
	ib->external_nlba = get32(in + 0x3C);
	ib->internal_lbasize = get32(in + 0x40);
	ib->internal_nlba = get32(in + 0x44);
	ib->nfree = get32(in + 0x48);
	ib->infosize = get32(in + 0x4C);
	ib->nextoff = get64(in + 0x50);
	ib->dataoff = get64(in + 0x58);
	ib->mapoff = get64(in + 0x60);
	ib->logoff = get64(in + 0x68);
	ib->info2off = get64(in + 0x70);
	ib->checksum = get64(in + 0xFF8);
	if (checksum_ok) {
		memcpy(copy, in, BTT_INFO_SIZE);
		memset(copy + 0xFF8, 0, 8);
		*checksum_ok = btt_fletcher64(copy, BTT_INFO_SIZE) == ib->checksum;
	}
}

const uint32_t btt_sector_sizes[BTT_NSECTOR_SIZES] = {512, 520, 528, 4096, 4104, 4160, 4224};

int btt_lbasize_supported(uint32_t lbasize)
{
	for (size_t i = 0; i < BTT_NSECTOR_SIZES; i++)
		if (btt_sector_sizes[i] == lbasize)
			return 1;
	return 0;
}

uint32_t btt_internal_lbasize(uint32_t lbasize)
{
	return (lbasize + 63u) & ~63u; /* the kernel's INT_LBASIZE_ALIGNMENT */
}

/* Bytes per LBA that reach the user: the Linux logical block size. The rest of an
 * external block (520 - 512, ...) is integrity metadata NBD has no channel for. */
uint32_t data_bytes(uint32_t lbasize)
{
	return lbasize >= 4096 ? 4096 : 512;
}

int btt_compute_layout(uint64_t rawsize, uint32_t lbasize, uint64_t arena_max,
		       struct btt_arena_layout *out, int max)
{
	const uint64_t logsize = ((uint64_t)BTT_NFREE * BTT_LOG_GROUP + BTT_PG_SIZE - 1) &
				 ~(uint64_t)(BTT_PG_SIZE - 1);
	uint64_t remaining = rawsize, off = 0, lba = 0;
	uint32_t ilbs;
	int n = 0;

	if (!btt_lbasize_supported(lbasize)) {
		char list[64];
		size_t len = 0;

		for (size_t i = 0; i < BTT_NSECTOR_SIZES && len < sizeof(list); i++)
			len += (size_t)snprintf(list + len, sizeof(list) - len, "%s%u", i ? " " : "",
						btt_sector_sizes[i]);
		return seterr(EINVAL, "sector size %u is not one of %s", lbasize, list);
	}
	if (arena_max == 0)
		arena_max = BTT_ARENA_MAX;
	if (arena_max < BTT_ARENA_MIN || arena_max > BTT_ARENA_MAX || arena_max % BTT_PG_SIZE)
		return seterr(EINVAL, "arena size limit %llu is out of range",
			      (unsigned long long)arena_max);
	if (rawsize < BTT_ARENA_MIN)
		return seterr(ENXIO, "BTT raw size %llu is below the 16 MiB minimum",
			      (unsigned long long)rawsize);
	ilbs = btt_internal_lbasize(lbasize);
	while (remaining > 0) {
		uint64_t s = remaining < arena_max ? remaining : arena_max;
		uint64_t avail, internal, mapsize;
		struct btt_arena_layout l;

		remaining -= s;
		if (s < BTT_ARENA_MIN)
			break; /* a tail under 16 MiB is left unused, as the kernel does */
		avail = (s & ~(uint64_t)(BTT_PG_SIZE - 1)) - 2 * BTT_INFO_SIZE - logsize;
		internal = (avail - BTT_PG_SIZE) / (ilbs + 4);
		mapsize = (4 * (internal - BTT_NFREE) + BTT_PG_SIZE - 1) & ~(uint64_t)(BTT_PG_SIZE - 1);
		l.start = off;
		l.size = s;
		l.lba_start = lba;
		l.internal_nlba = (uint32_t)internal;
		l.external_nlba = (uint32_t)(internal - BTT_NFREE);
		l.internal_lbasize = ilbs;
		l.nfree = BTT_NFREE;
		l.dataoff = BTT_INFO_SIZE;
		l.mapoff = BTT_INFO_SIZE + avail - mapsize;
		l.logoff = BTT_INFO_SIZE + avail;
		l.info2off = l.logoff + logsize;
		l.nextoff = remaining >= BTT_ARENA_MIN ? s : 0;
		if (n < max)
			out[n] = l;
		n++;
		off += s;
		lba += l.external_nlba;
	}
	return n;
}

static void initial_flog(uint8_t *flog, const struct btt_arena_layout *l)
{
	memset(flog, 0, (size_t)(l->info2off - l->logoff));
	for (uint32_t i = 0; i < l->nfree; i++) {
		uint8_t *slot0 = flog + (size_t)i * BTT_LOG_GROUP;
		put32(slot0 + 0, i);
		put32(slot0 + 4, l->external_nlba + i);
		put32(slot0 + 8, l->external_nlba + i);
		put32(slot0 + 12, 1);
	}
}

static void info_from_layout(struct btt_info *ib, const struct btt_format_params *p,
			     const struct btt_arena_layout *l)
{
	memset(ib, 0, sizeof(*ib));
	memcpy(ib->signature, BTT_SIG, 16);
	memcpy(ib->uuid, p->uuid, 16);
	memcpy(ib->parent_uuid, p->parent_uuid, 16);
	ib->version_major = p->version_major;
	ib->version_minor = p->version_minor;
	ib->external_lbasize = p->lbasize;
	ib->external_nlba = l->external_nlba;
	ib->internal_lbasize = l->internal_lbasize;
	ib->internal_nlba = l->internal_nlba;
	ib->nfree = l->nfree;
	ib->infosize = BTT_INFO_SIZE;
	ib->nextoff = l->nextoff;
	ib->dataoff = l->dataoff;
	ib->mapoff = l->mapoff;
	ib->logoff = l->logoff;
	ib->info2off = l->info2off;
}

int btt_format(struct btt_io *io, const struct btt_format_params *p)
{
	static const uint8_t zeros[BTT_PG_SIZE];
	uint64_t initial, base, rawsize;
	struct btt_arena_layout *lay = NULL;
	uint8_t block[BTT_INFO_SIZE], *flog = NULL;
	int n, rc;

	if (!((p->version_major == 1 && p->version_minor == 1) ||
	      (p->version_major == 2 && p->version_minor == 0)))
		return seterr(EINVAL, "BTT version %u.%u is not 1.1 or 2.0", p->version_major,
			      p->version_minor);
	initial = p->version_major == 1 ? BTT_PG_SIZE : 0;
	if (p->ns_size < initial + BTT_ARENA_MIN)
		return seterr(ENXIO, "namespace of %llu bytes is too small for a BTT %u.%u (needs %llu)",
			      (unsigned long long)p->ns_size, p->version_major, p->version_minor,
			      (unsigned long long)(initial + BTT_ARENA_MIN));
	if (p->ns_offset + p->ns_size < p->ns_offset ||
	    btt_io_size(io) < p->ns_offset + p->ns_size)
		return seterr(EINVAL, "namespace [%llu, +%llu) lies beyond the end of the backing store",
			      (unsigned long long)p->ns_offset, (unsigned long long)p->ns_size);
	rawsize = p->ns_size - initial;
	base = p->ns_offset + initial;
	n = btt_compute_layout(rawsize, p->lbasize, p->arena_max, NULL, 0);
	if (n < 0)
		return n;
	lay = calloc((size_t)n, sizeof(*lay));
	flog = malloc(BTT_NFREE * BTT_LOG_GROUP * 2);
	if (!lay || !flog) {
		rc = seterr(ENOMEM, "out of memory");
		goto out;
	}
	btt_compute_layout(rawsize, p->lbasize, p->arena_max, lay, n);

	/* The page where the other BTT version would keep its info block is cleared, so a
	 * stale BTT of the other version can never be autodetected in place of this one. */
	rc = io->ops->write(io, zeros, sizeof(zeros), p->ns_offset + (initial ? 0 : BTT_PG_SIZE));
	/* Map zeroed (every entry identity) and flog initialised in every arena, then the
	 * info blocks: backups, later arenas, and arena 0's primary last, so a crash during
	 * format leaves either no BTT or a complete one. */
	for (int i = 0; i < n && !rc; i++) {
		const struct btt_arena_layout *l = &lay[i];
		uint64_t a = base + l->start;
		rc = io->ops->zero(io, a + l->mapoff, l->logoff - l->mapoff);
		if (!rc) {
			initial_flog(flog, l);
			rc = io->ops->write(io, flog, (size_t)(l->info2off - l->logoff), a + l->logoff);
		}
	}
	if (!rc)
		rc = io->ops->sync(io);
	for (int i = n - 1; i >= 0 && !rc; i--) {
		struct btt_info ib;
		info_from_layout(&ib, p, &lay[i]);
		btt_info_pack(&ib, block);
		rc = io->ops->write(io, block, sizeof(block), base + lay[i].start + lay[i].info2off);
		if (!rc && i > 0)
			rc = io->ops->write(io, block, sizeof(block), base + lay[i].start);
	}
	if (!rc)
		rc = io->ops->sync(io);
	if (!rc) {
		struct btt_info ib;
		info_from_layout(&ib, p, &lay[0]);
		btt_info_pack(&ib, block);
		rc = io->ops->write(io, block, sizeof(block), base);
	}
	if (!rc)
		rc = io->ops->sync(io);
out:
	free(lay);
	free(flog);
	return rc;
}
