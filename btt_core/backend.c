/*
 * backend.c - the I/O vtable's two implementations.
 *
 * file:   pread/pwrite/fdatasync on a (possibly sparse) file; production.
 * memory: copy-on-write 4 KiB pages, cheap to clone, optionally recording every write
 *         and every completed sync, which is what the crash-state tests replay.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "btt_int.h"

/* ---- file backend ------------------------------------------------------------ */

/* What a client can act on: a full disk, or an I/O error. Whatever else the file system
 * says (EINVAL, EFBIG, ...) is reported as EIO, with the real cause in the message; an
 * EINVAL would tell an NBD client that its request was malformed. */
static int io_errno(int err)
{
	return err == ENOSPC || err == EDQUOT ? ENOSPC : err == ENOMEM ? ENOMEM : EIO;
}

struct file_io {
	struct btt_io io;
	int fd;
};

static int file_read(struct btt_io *io, void *buf, size_t len, uint64_t off)
{
	int fd = ((struct file_io *)io)->fd;
	uint8_t *p = buf;

	while (len) {
		ssize_t n = pread(fd, p, len, (off_t)off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return seterr(io_errno(errno), "read of %zu bytes at offset %llu failed: %s",
				      len, (unsigned long long)off, strerror(errno));
		if (n == 0)
			return seterr(EIO, "read at offset %llu is past the end of the file",
				      (unsigned long long)off);
		p += n, len -= (size_t)n, off += (uint64_t)n;
	}
	return 0;
}

static int file_write(struct btt_io *io, const void *buf, size_t len, uint64_t off)
{
	int fd = ((struct file_io *)io)->fd;
	const uint8_t *p = buf;

	while (len) {
		ssize_t n = pwrite(fd, p, len, (off_t)off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return seterr(io_errno(errno), "write of %zu bytes at offset %llu failed: %s",
				      len, (unsigned long long)off, strerror(errno));
		if (n == 0)
			return seterr(EIO, "write at offset %llu made no progress",
				      (unsigned long long)off);
		p += n, len -= (size_t)n, off += (uint64_t)n;
	}
	return 0;
}

static int file_sync(struct btt_io *io)
{
	/* Never retried: after a failed fdatasync the kernel may have dropped the dirty
	 * pages, so a second call succeeding would prove nothing. */
	if (fdatasync(((struct file_io *)io)->fd) < 0)
		return seterr(io_errno(errno), "fdatasync failed: %s", strerror(errno));
	return 0;
}

static int file_zero(struct btt_io *io, uint64_t off, uint64_t len)
{
	static const uint8_t zeros[1 << 16];
	int fd = ((struct file_io *)io)->fd;

	if (len == 0)
		return 0;
	/* A punched hole reads as zeros and costs nothing: a 1 TiB BTT's 1 GiB map is
	 * "zeroed" in microseconds instead of written. */
	if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) == 0)
		return 0;
	while (len) {
		size_t n = len < sizeof(zeros) ? (size_t)len : sizeof(zeros);
		int rc = file_write(io, zeros, n, off);
		if (rc)
			return rc;
		off += n, len -= n;
	}
	return 0;
}

static int file_allocate(struct btt_io *io, uint64_t off, uint64_t len)
{
	int rc = posix_fallocate(((struct file_io *)io)->fd, (off_t)off, (off_t)len);

	if (rc)
		return seterr(io_errno(rc), "cannot allocate %llu bytes at offset %llu: %s",
			      (unsigned long long)len, (unsigned long long)off, strerror(rc));
	return 0;
}

static uint64_t file_seek(struct btt_io *io, uint64_t off, int whence)
{
	off_t r = lseek(((struct file_io *)io)->fd, (off_t)off, whence);

	if (r >= 0)
		return (uint64_t)r;
	if (errno == ENXIO) /* no data (or hole) after off: the rest reads as zeros */
		return whence == SEEK_DATA ? UINT64_MAX : off;
	return whence == SEEK_DATA ? off : UINT64_MAX; /* cannot tell: assume data */
}

static uint64_t file_next_data(struct btt_io *io, uint64_t off)
{
	return file_seek(io, off, SEEK_DATA);
}

static uint64_t file_next_hole(struct btt_io *io, uint64_t off)
{
	return file_seek(io, off, SEEK_HOLE);
}

static uint64_t file_size(struct btt_io *io)
{
	struct stat st;

	if (fstat(((struct file_io *)io)->fd, &st) < 0)
		return 0;
	return (uint64_t)st.st_size;
}

static void file_destroy(struct btt_io *io)
{
	close(((struct file_io *)io)->fd);
	free(io);
}

static const struct btt_io_ops file_ops = {
	.read = file_read, .write = file_write, .sync = file_sync,
	.zero = file_zero, .allocate = file_allocate, .next_data = file_next_data,
	.next_hole = file_next_hole, .size = file_size, .destroy = file_destroy,
};

int btt_file_open(const char *path, int readonly, unsigned create_mode, uint64_t min_size,
		  struct btt_io **out)
{
	int strict = !readonly || create_mode;
	/* O_NONBLOCK: opening a FIFO planted at the path must fail the type check below,
	 * not hang; it is cleared again once the file is known to be what we expect. */
	int flags = (readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_NONBLOCK |
		    (strict ? O_NOFOLLOW : 0) | (create_mode && !readonly ? O_CREAT : 0);
	int fd = open(path, flags, (mode_t)create_mode);
	struct stat st;
	struct file_io *f;

	if (fd < 0) {
		int e = errno;
		if (e == ELOOP && strict)
			return seterr(ELOOP, "%s is a symbolic link; refusing to follow it for "
				      "writing (name the file itself)", path);
		return seterr(e, "cannot open %s: %s", path, strerror(e));
	}
	if (fstat(fd, &st) < 0) {
		int e = errno;
		close(fd);
		return seterr(e, "cannot stat %s: %s", path, strerror(e));
	}
	if (!(S_ISREG(st.st_mode) || (!strict && S_ISBLK(st.st_mode)))) {
		close(fd);
		return seterr(EINVAL, "%s is not a regular file%s; refusing to %s it", path,
			      strict ? "" : " or block device", strict ? "write to" : "use");
	}
	if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) < 0) {
		int e = errno;
		close(fd);
		return seterr(e, "cannot set up %s: %s", path, strerror(e));
	}
	if (S_ISREG(st.st_mode) && (uint64_t)st.st_size < min_size) {
		if (readonly) {
			close(fd);
			return seterr(EINVAL, "%s is %lld bytes, smaller than the %llu needed", path,
				      (long long)st.st_size, (unsigned long long)min_size);
		}
		if (ftruncate(fd, (off_t)min_size) < 0) {
			int e = errno;
			close(fd);
			return seterr(e, "cannot extend %s to %llu bytes: %s", path,
				      (unsigned long long)min_size, strerror(e));
		}
	}
	f = calloc(1, sizeof(*f));
	if (!f) {
		close(fd);
		return seterr(ENOMEM, "out of memory");
	}
	/* No POSIX_FADV_RANDOM: the kernel's readahead already reads only what was asked
	 * on a random miss, while FADV_RANDOM also turned every sequential miss into a
	 * single-block read (a cold 128 KiB sequential read ran at ~0.1 GB/s instead of
	 * 1.3-2.3 GB/s; BTT data blocks of sequentially written LBAs are contiguous). */
	f->io.ops = &file_ops;
	f->fd = fd;
	*out = &f->io;
	return 0;
}

int btt_file_ident(struct btt_io *io, uint64_t *dev, uint64_t *ino)
{
	struct stat st;

	if (io->ops != &file_ops)
		return seterr(EINVAL, "not a file backend");
	if (fstat(((struct file_io *)io)->fd, &st) < 0)
		return seterr(errno, "fstat: %s", strerror(errno));
	*dev = (uint64_t)st.st_dev;
	*ino = (uint64_t)st.st_ino;
	return 0;
}

/* ---- memory backend ----------------------------------------------------------- */

#define MEM_PG 4096u

struct mem_page {
	uint32_t refs; /* pages are shared between clones until written */
	uint8_t data[MEM_PG];
};

struct mem_record {
	int kind;
	uint64_t seq; /* from one clock shared by all images: orders journal vs data writes */
	uint64_t off, len;
	uint8_t *data; /* NULL for a zeroing write */
};

struct mem_io {
	struct btt_io io;
	pthread_mutex_t lock;
	uint64_t size;
	size_t npages;
	struct mem_page **pages; /* NULL = all zeros */
	int recording;
	int fail_sync;
	unsigned sync_delay_us; /* a sync that takes time, as a disk's does */
	struct mem_record *recs;
	size_t nrecs, caprecs;
};

static void page_put(struct mem_page *pg)
{
	if (pg && __atomic_sub_fetch(&pg->refs, 1, __ATOMIC_ACQ_REL) == 0)
		free(pg);
}

/* A page this image may write: private, copied if shared. */
static struct mem_page *page_writable(struct mem_io *m, size_t i)
{
	struct mem_page *pg = m->pages[i], *copy;

	if (pg && __atomic_load_n(&pg->refs, __ATOMIC_ACQUIRE) == 1)
		return pg;
	copy = malloc(sizeof(*copy));
	if (!copy)
		return NULL;
	copy->refs = 1;
	if (pg)
		memcpy(copy->data, pg->data, MEM_PG);
	else
		memset(copy->data, 0, MEM_PG);
	page_put(pg);
	m->pages[i] = copy;
	return copy;
}

static int mem_read(struct btt_io *io, void *buf, size_t len, uint64_t off)
{
	struct mem_io *m = (struct mem_io *)io;
	uint8_t *p = buf;

	if (off > m->size || len > m->size - off)
		return seterr(EIO, "read at offset %llu is past the end of the image",
			      (unsigned long long)off);
	pthread_mutex_lock(&m->lock);
	while (len) {
		size_t i = (size_t)(off / MEM_PG), in = (size_t)(off % MEM_PG);
		size_t n = MEM_PG - in < len ? MEM_PG - in : len;
		if (m->pages[i])
			memcpy(p, m->pages[i]->data + in, n);
		else
			memset(p, 0, n);
		p += n, off += n, len -= n;
	}
	pthread_mutex_unlock(&m->lock);
	return 0;
}

static int mem_store(struct mem_io *m, const void *buf, size_t len, uint64_t off)
{
	const uint8_t *p = buf;

	while (len) {
		size_t i = (size_t)(off / MEM_PG), in = (size_t)(off % MEM_PG);
		size_t n = MEM_PG - in < len ? MEM_PG - in : len;
		if (!buf && in == 0 && n == MEM_PG) {
			page_put(m->pages[i]);
			m->pages[i] = NULL;
		} else {
			struct mem_page *pg = page_writable(m, i);
			if (!pg)
				return seterr(ENOMEM, "out of memory");
			if (p)
				memcpy(pg->data + in, p, n);
			else
				memset(pg->data + in, 0, n);
		}
		if (p)
			p += n;
		off += n, len -= n;
	}
	return 0;
}

static _Atomic uint64_t record_clock;

uint64_t btt_mem_record_clock(void)
{
	return atomic_load(&record_clock);
}

static int mem_record(struct mem_io *m, int kind, const void *buf, uint64_t len, uint64_t off)
{
	struct mem_record *r;

	if (!m->recording)
		return 0;
	if (m->nrecs == m->caprecs) {
		size_t cap = m->caprecs ? m->caprecs * 2 : 256;
		void *n = realloc(m->recs, cap * sizeof(*m->recs));
		if (!n)
			return seterr(ENOMEM, "out of memory");
		m->recs = n, m->caprecs = cap;
	}
	r = &m->recs[m->nrecs];
	r->kind = kind, r->off = off, r->len = len, r->data = NULL;
	r->seq = atomic_fetch_add(&record_clock, 1);
	if (buf) {
		r->data = malloc(len ? len : 1);
		if (!r->data)
			return seterr(ENOMEM, "out of memory");
		memcpy(r->data, buf, len);
	}
	m->nrecs++;
	return 0;
}

static int mem_write_locked(struct mem_io *m, const void *buf, size_t len, uint64_t off)
{
	int rc;

	if (off > m->size || len > m->size - off)
		return seterr(ENOSPC, "write at offset %llu is past the end of the image",
			      (unsigned long long)off);
	rc = mem_record(m, BTT_REC_WRITE, buf, len, off);
	return rc ? rc : mem_store(m, buf, len, off);
}

static int mem_write(struct btt_io *io, const void *buf, size_t len, uint64_t off)
{
	struct mem_io *m = (struct mem_io *)io;
	int rc;

	pthread_mutex_lock(&m->lock);
	rc = mem_write_locked(m, buf, len, off);
	pthread_mutex_unlock(&m->lock);
	return rc;
}

static int mem_sync(struct btt_io *io)
{
	struct mem_io *m = (struct mem_io *)io;
	int rc;

	pthread_mutex_lock(&m->lock);
	if (m->fail_sync)
		rc = seterr(m->fail_sync, "injected sync failure");
	else
		rc = mem_record(m, BTT_REC_SYNC, NULL, 0, 0);
	pthread_mutex_unlock(&m->lock);
	/* The barrier is recorded where it starts, and covers only what was written before
	 * it; the writes other threads issue while it "runs" count as after it, which is the
	 * conservative reading of a real fdatasync racing with writes. */
	if (!rc && m->sync_delay_us)
		usleep(m->sync_delay_us);
	return rc;
}

static int mem_zero(struct btt_io *io, uint64_t off, uint64_t len)
{
	struct mem_io *m = (struct mem_io *)io;
	int rc;

	pthread_mutex_lock(&m->lock);
	rc = mem_write_locked(m, NULL, (size_t)len, off);
	pthread_mutex_unlock(&m->lock);
	return rc;
}

static uint64_t mem_size(struct btt_io *io)
{
	return ((struct mem_io *)io)->size;
}

static void mem_destroy(struct btt_io *io)
{
	struct mem_io *m = (struct mem_io *)io;

	for (size_t i = 0; i < m->npages; i++)
		page_put(m->pages[i]);
	btt_mem_record_clear(io);
	free(m->recs);
	free(m->pages);
	pthread_mutex_destroy(&m->lock);
	free(m);
}

/* Pages never written (or zeroed) are the memory image's holes. */
static uint64_t mem_next(struct btt_io *io, uint64_t off, bool data)
{
	struct mem_io *m = (struct mem_io *)io;
	uint64_t found = data ? UINT64_MAX : m->size;

	pthread_mutex_lock(&m->lock);
	for (size_t i = (size_t)(off / MEM_PG); i < m->npages; i++) {
		if ((m->pages[i] != NULL) == data) {
			found = (uint64_t)i * MEM_PG > off ? (uint64_t)i * MEM_PG : off;
			break;
		}
	}
	pthread_mutex_unlock(&m->lock);
	return found;
}

static uint64_t mem_next_data(struct btt_io *io, uint64_t off)
{
	return mem_next(io, off, true);
}

static uint64_t mem_next_hole(struct btt_io *io, uint64_t off)
{
	return mem_next(io, off, false);
}

static int mem_allocate(struct btt_io *io, uint64_t off, uint64_t len)
{
	return 0; /* memory images never run out of space */
}

static const struct btt_io_ops mem_ops = {
	.read = mem_read, .write = mem_write, .sync = mem_sync,
	.zero = mem_zero, .allocate = mem_allocate, .next_data = mem_next_data,
	.next_hole = mem_next_hole, .size = mem_size, .destroy = mem_destroy,
};

static struct mem_io *mem_alloc(uint64_t size)
{
	struct mem_io *m = calloc(1, sizeof(*m));

	if (!m)
		return NULL;
	m->io.ops = &mem_ops;
	m->size = size;
	m->npages = (size_t)((size + MEM_PG - 1) / MEM_PG);
	m->pages = calloc(m->npages ? m->npages : 1, sizeof(*m->pages));
	if (!m->pages) {
		free(m);
		return NULL;
	}
	pthread_mutex_init(&m->lock, NULL);
	return m;
}

struct btt_io *btt_mem_new(uint64_t size)
{
	struct mem_io *m = mem_alloc(size);
	return m ? &m->io : NULL;
}

struct btt_io *btt_mem_clone(struct btt_io *io)
{
	struct mem_io *src = (struct mem_io *)io, *m;

	if (io->ops != &mem_ops)
		return NULL;
	m = mem_alloc(src->size);
	if (!m)
		return NULL;
	pthread_mutex_lock(&src->lock);
	for (size_t i = 0; i < m->npages; i++) {
		m->pages[i] = src->pages[i];
		if (m->pages[i])
			__atomic_add_fetch(&m->pages[i]->refs, 1, __ATOMIC_ACQ_REL);
	}
	pthread_mutex_unlock(&src->lock);
	return &m->io;
}

static struct mem_io *as_mem(struct btt_io *io)
{
	return io && io->ops == &mem_ops ? (struct mem_io *)io : NULL;
}

int btt_mem_set_recording(struct btt_io *io, int on)
{
	struct mem_io *m = as_mem(io);
	if (!m)
		return -EINVAL;
	m->recording = on;
	return 0;
}

size_t btt_mem_record_count(struct btt_io *io)
{
	struct mem_io *m = as_mem(io);
	return m ? m->nrecs : 0;
}

int btt_mem_record_get(struct btt_io *io, size_t i, int *kind, uint64_t *seq, uint64_t *off,
		       uint64_t *len)
{
	struct mem_io *m = as_mem(io);

	if (!m || i >= m->nrecs)
		return -EINVAL;
	*kind = m->recs[i].kind, *off = m->recs[i].off, *len = m->recs[i].len;
	*seq = m->recs[i].seq;
	return 0;
}

int btt_mem_record_data(struct btt_io *io, size_t i, void *buf, size_t len)
{
	struct mem_io *m = as_mem(io);

	if (!m || i >= m->nrecs || len != m->recs[i].len)
		return -EINVAL;
	if (m->recs[i].data)
		memcpy(buf, m->recs[i].data, len);
	else
		memset(buf, 0, len);
	return 0;
}

void btt_mem_record_clear(struct btt_io *io)
{
	struct mem_io *m = as_mem(io);

	if (!m)
		return;
	for (size_t i = 0; i < m->nrecs; i++)
		free(m->recs[i].data);
	m->nrecs = 0;
}

int btt_mem_poke(struct btt_io *io, const void *buf, size_t len, uint64_t off)
{
	struct mem_io *m = as_mem(io);
	int rc;

	if (!m)
		return -EINVAL;
	if (off > m->size || len > m->size - off)
		return -EINVAL;
	pthread_mutex_lock(&m->lock);
	rc = mem_store(m, buf, len, off);
	pthread_mutex_unlock(&m->lock);
	return rc;
}

int btt_mem_fail_sync(struct btt_io *io, int err)
{
	struct mem_io *m = as_mem(io);
	if (!m)
		return -EINVAL;
	m->fail_sync = err;
	return 0;
}

int btt_mem_set_sync_delay(struct btt_io *io, unsigned usec)
{
	struct mem_io *m = as_mem(io);
	if (!m)
		return -EINVAL;
	m->sync_delay_us = usec;
	return 0;
}

/* ---- generic wrappers ----------------------------------------------------------- */

void btt_io_destroy(struct btt_io *io)
{
	if (io)
		io->ops->destroy(io);
}

int btt_io_read(struct btt_io *io, void *buf, size_t len, uint64_t off)
{
	return io->ops->read(io, buf, len, off);
}

int btt_io_write(struct btt_io *io, const void *buf, size_t len, uint64_t off)
{
	return io->ops->write(io, buf, len, off);
}

int btt_io_sync(struct btt_io *io)
{
	return io->ops->sync(io);
}

uint64_t btt_io_size(struct btt_io *io)
{
	return io->ops->size(io);
}

int btt_io_zero(struct btt_io *io, uint64_t off, uint64_t len)
{
	return io->ops->zero(io, off, len);
}
