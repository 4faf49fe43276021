/*
 * writelog.c - a recording backend layered on another one, as dm-log-writes is on a disk
 * (writelog.h; the format is docs/write-log.md).
 *
 * Ordering rules, which make every state the replayer builds one the real files could be in:
 *  - a WRITE or ZERO is appended after the call below it returned, so a record before a
 *    SYNC's start is a write the fdatasync covered;
 *  - a SYNC notes the log position when it started (`covers`) and is appended when it
 *    returned: writes appended meanwhile, by other threads, are not claimed durable.
 * Appends are serialised by one mutex and are one writev each: the order in the file is
 * the order of the sequence numbers.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "btt_int.h"
#include "writelog.h"

#define WL_MAGIC "BTTWLOG1"
#define WL_RECORD_MAGIC 0x524c5742u /* "BWLR" */
#define WL_VERSION 1u
#define WL_NOTE_MAX 255u
#define WL_SNAPSHOT_MAX (64ull << 20) /* a journal bigger than this is not copied in */

/* The on-disk record header, little-endian (x86 and arm64 hosts are; docs/write-log.md). */
struct wl_record {
	uint32_t magic;
	uint16_t type;
	uint16_t target;
	uint64_t seq;
	uint64_t id;
	uint64_t off;
	uint64_t len;
	uint32_t aux;
	uint32_t data_crc;
	uint32_t dlen;    /* bytes of data after the header */
	uint32_t hdr_crc; /* crc32c of the 52 bytes before it */
} __attribute__((packed));

_Static_assert(sizeof(struct wl_record) == BTT_WL_RECORD_SIZE, "docs/write-log.md");

struct btt_writelog {
	pthread_mutex_t lock;
	int fd;
	uint64_t next_seq;  /* under lock */
	uint32_t targets;   /* under lock */
	_Atomic int refs;   /* the creator's, plus one per wrapper */
	_Atomic int failed; /* an append failed: every later call fails (no silent gaps) */
	_Atomic uint64_t ids; /* the last request id handed out for marks */
};

struct wl_io {
	struct btt_io io;
	struct btt_io *inner;
	struct btt_writelog *log;
	uint16_t target;
};

static void put_log(struct btt_writelog *log)
{
	if (atomic_fetch_sub(&log->refs, 1) != 1)
		return;
	/* The log is evidence: a host crash soon after a clean stop must not cut its tail, which
	 * a replay could not tell from a shorter workload. */
	(void)fdatasync(log->fd);
	close(log->fd);
	pthread_mutex_destroy(&log->lock);
	free(log);
}

static int write_all(int fd, struct iovec *iov, int n)
{
	while (n > 0) {
		ssize_t w = writev(fd, iov, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return w < 0 ? errno : EIO;
		while (n > 0 && (size_t)w >= iov->iov_len) {
			w -= (ssize_t)iov->iov_len;
			iov++, n--;
		}
		if (n > 0) {
			iov->iov_base = (uint8_t *)iov->iov_base + w;
			iov->iov_len -= (size_t)w;
		}
	}
	return 0;
}

/* Appends one record; data may be NULL (len then only describes the range). */
static int append(struct btt_writelog *log, uint16_t type, uint16_t target, uint64_t id,
		  uint64_t off, uint64_t len, const void *data, size_t dlen, uint32_t aux)
{
	struct wl_record r = {
		.magic = WL_RECORD_MAGIC, .type = type, .target = target, .id = id, .off = off,
		.len = len, .aux = aux, .data_crc = dlen ? btt_crc32c(0, data, dlen) : 0,
		.dlen = (uint32_t)dlen,
	};
	struct iovec iov[2] = {{&r, sizeof(r)}, {(void *)data, dlen}};
	int err;

	if (dlen > UINT32_MAX)
		return seterr(EFBIG, "a write of %zu bytes is too big for one write-log record", dlen);
	pthread_mutex_lock(&log->lock);
	if (atomic_load(&log->failed)) {
		pthread_mutex_unlock(&log->lock);
		return seterr(EIO, "the write log failed earlier; refusing I/O it would not record");
	}
	r.seq = log->next_seq;
	r.hdr_crc = btt_crc32c(0, &r, offsetof(struct wl_record, hdr_crc));
	err = write_all(log->fd, iov, dlen ? 2 : 1);
	if (err)
		atomic_store(&log->failed, 1);
	else
		log->next_seq++;
	pthread_mutex_unlock(&log->lock);
	if (err)
		return seterr(err == ENOSPC || err == EDQUOT ? ENOSPC : EIO,
			      "cannot append to the write log: %s", strerror(err));
	return 0;
}

static uint64_t position(struct btt_writelog *log)
{
	uint64_t seq;

	pthread_mutex_lock(&log->lock);
	seq = log->next_seq;
	pthread_mutex_unlock(&log->lock);
	return seq;
}

/* ---- the wrapping backend ------------------------------------------------------- */

static struct wl_io *W(struct btt_io *io)
{
	return (struct wl_io *)io;
}

static int wl_read(struct btt_io *io, void *buf, size_t len, uint64_t off)
{
	return W(io)->inner->ops->read(W(io)->inner, buf, len, off);
}

static int wl_write(struct btt_io *io, const void *buf, size_t len, uint64_t off)
{
	struct wl_io *w = W(io);
	int rc;

	if (atomic_load(&w->log->failed))
		return seterr(EIO, "the write log failed earlier; refusing I/O it would not record");
	rc = w->inner->ops->write(w->inner, buf, len, off);
	/* A failed write may have changed some of the range: recorded as a write of what was
	 * asked, with its errno, so the replayer may apply it or not. */
	int lrc = append(w->log, BTT_WL_WRITE, w->target, 0, off, len, buf, len,
			 rc < 0 ? (uint32_t)-rc : 0);
	return rc ? rc : lrc;
}

static int wl_sync(struct btt_io *io)
{
	struct wl_io *w = W(io);
	uint64_t covers = position(w->log);
	int rc = w->inner->ops->sync(w->inner);

	if (rc)
		return rc; /* nothing is known durable: not recorded */
	return append(w->log, BTT_WL_SYNC, w->target, 0, covers, 0, NULL, 0, 0);
}

static int wl_zero(struct btt_io *io, uint64_t off, uint64_t len)
{
	struct wl_io *w = W(io);
	int rc;

	if (atomic_load(&w->log->failed))
		return seterr(EIO, "the write log failed earlier; refusing I/O it would not record");
	rc = w->inner->ops->zero(w->inner, off, len);
	int lrc = append(w->log, BTT_WL_ZERO, w->target, 0, off, len, NULL, 0,
			 rc < 0 ? (uint32_t)-rc : 0);
	return rc ? rc : lrc;
}

static int wl_allocate(struct btt_io *io, uint64_t off, uint64_t len)
{
	/* Contents unchanged (holes keep reading zeros): nothing to record. */
	return W(io)->inner->ops->allocate(W(io)->inner, off, len);
}

static uint64_t wl_next_data(struct btt_io *io, uint64_t off)
{
	return W(io)->inner->ops->next_data(W(io)->inner, off);
}

static uint64_t wl_next_hole(struct btt_io *io, uint64_t off)
{
	return W(io)->inner->ops->next_hole(W(io)->inner, off);
}

static uint64_t wl_size(struct btt_io *io)
{
	return W(io)->inner->ops->size(W(io)->inner);
}

static void wl_destroy(struct btt_io *io)
{
	struct wl_io *w = W(io);

	w->inner->ops->destroy(w->inner);
	put_log(w->log);
	free(w);
}

static const struct btt_io_ops wl_ops = {
	.read = wl_read, .write = wl_write, .sync = wl_sync, .zero = wl_zero,
	.allocate = wl_allocate, .next_data = wl_next_data, .next_hole = wl_next_hole,
	.size = wl_size, .destroy = wl_destroy,
};

/* ---- the log ---------------------------------------------------------------------- */

int btt_writelog_create(const char *path, const char *note, struct btt_writelog **out)
{
	uint8_t hdr[BTT_WL_HEADER_SIZE] = {0};
	uint32_t v, crc;
	uint64_t now = (uint64_t)time(NULL);
	size_t nlen = note ? strnlen(note, WL_NOTE_MAX) : 0;
	struct btt_writelog *log;
	struct iovec iov = {hdr, sizeof(hdr)};
	int fd, err;

	/* Never an existing file (a log is evidence; clobbering one loses it), never through
	 * a link planted at the path. */
	fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_APPEND, 0600);
	if (fd < 0) {
		err = errno;
		if (err == EEXIST)
			return seterr(EEXIST, "write log %s already exists; refusing to overwrite it "
				      "(name a new file)", path);
		return seterr(err, "cannot create write log %s: %s", path, strerror(err));
	}
	memcpy(hdr, WL_MAGIC, 8);
	v = WL_VERSION;
	memcpy(hdr + 8, &v, 4);
	v = BTT_WL_HEADER_SIZE;
	memcpy(hdr + 12, &v, 4);
	v = BTT_WL_RECORD_SIZE;
	memcpy(hdr + 16, &v, 4);
	memcpy(hdr + 24, &now, 8);
	if (nlen)
		memcpy(hdr + 32, note, nlen);
	crc = btt_crc32c(0, hdr, BTT_WL_HEADER_SIZE - 4);
	memcpy(hdr + BTT_WL_HEADER_SIZE - 4, &crc, 4);
	err = write_all(fd, &iov, 1);
	if (err) {
		close(fd);
		unlink(path); /* ours: created above, with O_EXCL */
		return seterr(err, "cannot write the header of write log %s: %s", path,
			      strerror(err));
	}
	log = calloc(1, sizeof(*log));
	if (!log) {
		close(fd);
		unlink(path);
		return seterr(ENOMEM, "out of memory");
	}
	pthread_mutex_init(&log->lock, NULL);
	log->fd = fd;
	atomic_init(&log->refs, 1);
	atomic_init(&log->failed, 0);
	atomic_init(&log->ids, 0);
	*out = log;
	return 0;
}

/* The journal's content when recording starts: a replay needs it, and it is small. */
static int snapshot(struct btt_writelog *log, struct btt_io *inner, uint16_t target,
		    uint64_t size)
{
	uint8_t *buf;
	int rc;

	if (size == 0)
		return 0;
	if (size > WL_SNAPSHOT_MAX)
		return seterr(EFBIG, "journal of %llu bytes is too big to record",
			      (unsigned long long)size);
	buf = malloc(size);
	if (!buf)
		return seterr(ENOMEM, "out of memory");
	rc = inner->ops->read(inner, buf, size, 0);
	if (!rc)
		rc = append(log, BTT_WL_WRITE, target, 0, 0, size, buf, size, 0);
	free(buf);
	if (!rc)
		rc = append(log, BTT_WL_SYNC, target, 0, position(log), 0, NULL, 0, 0);
	return rc;
}

/* FILE record data: the file's size at open, then this, then the name. */
struct wl_file_data {
	uint64_t size;
	uint32_t durability;
	uint32_t reserved;
	uint8_t boot_id[16];
} __attribute__((packed));

int btt_writelog_wrap(struct btt_writelog *log, struct btt_io *inner,
		      const struct btt_writelog_file *file, const char *name,
		      struct btt_io **out, uint32_t *target)
{
	size_t nlen = name ? strnlen(name, 4096) : 0;
	struct wl_file_data fd = {.size = inner->ops->size(inner), .durability = file->durability};
	uint8_t *data;
	struct wl_io *w;
	uint32_t t;
	int rc;

	if (file->role != BTT_WL_ROLE_REGION && file->role != BTT_WL_ROLE_JOURNAL)
		return seterr(EINVAL, "unknown write-log role %u", file->role);
	memcpy(fd.boot_id, file->boot_id, sizeof(fd.boot_id));
	pthread_mutex_lock(&log->lock);
	t = ++log->targets;
	pthread_mutex_unlock(&log->lock);
	if (t > UINT16_MAX)
		return seterr(EMFILE, "too many files recorded in one write log");
	data = malloc(sizeof(fd) + nlen);
	w = calloc(1, sizeof(*w));
	if (!data || !w) {
		free(data);
		free(w);
		return seterr(ENOMEM, "out of memory");
	}
	memcpy(data, &fd, sizeof(fd));
	if (nlen)
		memcpy(data + sizeof(fd), name, nlen);
	rc = append(log, BTT_WL_FILE, (uint16_t)t, file->role, file->ns_offset, file->ns_size,
		    data, sizeof(fd) + nlen, 0);
	free(data);
	if (!rc && file->role == BTT_WL_ROLE_JOURNAL)
		rc = snapshot(log, inner, (uint16_t)t, fd.size);
	if (rc) {
		free(w);
		return rc;
	}
	w->io.ops = &wl_ops;
	w->inner = inner;
	w->log = log;
	w->target = (uint16_t)t;
	atomic_fetch_add(&log->refs, 1);
	*out = &w->io;
	*target = t;
	return 0;
}

int btt_writelog_mark(struct btt_writelog *log, uint32_t type, uint64_t id, uint64_t off,
		      uint64_t len, const void *data, uint32_t aux)
{
	if (type < BTT_WL_NBD_WRITE || type > BTT_WL_NBD_REPLY)
		return seterr(EINVAL, "write-log mark of unknown type %u", type);
	if (type != BTT_WL_NBD_WRITE)
		data = NULL;
	return append(log, (uint16_t)type, 0, id, off, len, data, data ? (size_t)len : 0, aux);
}

uint64_t btt_writelog_next_id(struct btt_writelog *log)
{
	return atomic_fetch_add(&log->ids, 1) + 1;
}

void btt_writelog_release(struct btt_writelog *log)
{
	if (log)
		put_log(log);
}

int btt_writelog_failed(struct btt_writelog *log)
{
	return atomic_load(&log->failed);
}
