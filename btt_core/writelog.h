/*
 * writelog.h - recording a server's writes (docs/write-log.md).
 *
 * A write log is one append-only file. Backends wrapped by it pass every call through to
 * the backend below and append a record of every write, hole punch and completed sync, in
 * the order they completed; the server adds marks for its NBD requests (a write issued, a
 * write or flush replied). From the log and a copy of the files as they were when recording
 * began, a replayer rebuilds every state a crash could have left (bttctl replay-log).
 *
 * The wrapper is chosen when a backend is opened: a server that does not record runs the
 * plain file backend and pays nothing.
 */
#ifndef BTT_WRITELOG_H
#define BTT_WRITELOG_H

#include <stddef.h>
#include <stdint.h>

/* Record types (docs/write-log.md, "Records"). */
enum {
	BTT_WL_FILE = 1,       /* a wrapped backend: target id, role, path, size at open */
	BTT_WL_WRITE = 2,      /* off, len, data: a completed pwrite of the target */
	BTT_WL_ZERO = 3,       /* off, len: a completed hole punch (reads zeros) */
	BTT_WL_SYNC = 4,       /* aux: every record with seq < aux is durable on the target */
	BTT_WL_NBD_WRITE = 16, /* id, off, len, data, aux = flags: an NBD write issued */
	BTT_WL_NBD_ZERO = 17,  /* id, off, len, aux = flags: an NBD zero/trim issued */
	BTT_WL_NBD_FLUSH = 18, /* id: an NBD flush issued */
	BTT_WL_NBD_REPLY = 19, /* id, aux = errno (0: success): the reply about to be sent */
};
/* NBD_WRITE/NBD_ZERO aux flag */
#define BTT_WL_FUA 1u
#define BTT_WL_HEADER_SIZE 4096u
#define BTT_WL_RECORD_SIZE 56u

struct btt_io;
struct btt_writelog;

/* Creates the log at path (O_EXCL|O_NOFOLLOW: never an existing file, never through a link)
 * and writes its header; `note` (up to 255 bytes) is kept there for people. */
int btt_writelog_create(const char *path, const char *note, struct btt_writelog **out);
/* What a FILE record says about a wrapped backend besides its path. */
struct btt_writelog_file {
	uint32_t role;         /* BTT_WL_ROLE_* */
	uint32_t durability;   /* enum btt_durability of the engine using it */
	uint64_t ns_offset;    /* the namespace the BTT lives in */
	uint64_t ns_size;
	uint8_t boot_id[16];   /* the engine's: its journal entries replay on this boot only */
};
/* Wraps `inner`, which the wrapper owns once this succeeded (on failure the caller still
 * does). The FILE record describes it (docs/write-log.md); the new target id goes to
 * *target. The log lives until the last wrapper and btt_writelog_release are gone. */
int btt_writelog_wrap(struct btt_writelog *log, struct btt_io *inner,
		      const struct btt_writelog_file *file, const char *name,
		      struct btt_io **out, uint32_t *target);
/* A server's mark: one record of the NBD_* types above (data only for NBD_WRITE). */
int btt_writelog_mark(struct btt_writelog *log, uint32_t type, uint64_t id, uint64_t off,
		      uint64_t len, const void *data, uint32_t aux);
/* The next request id for marks: unique within the log. */
uint64_t btt_writelog_next_id(struct btt_writelog *log);
/* The creator's reference; the file is closed when the wrappers are gone too. */
void btt_writelog_release(struct btt_writelog *log);
/* Whether appending has failed (the recording is then incomplete; the I/O carried on). */
int btt_writelog_failed(struct btt_writelog *log);

enum { BTT_WL_ROLE_REGION = 1, BTT_WL_ROLE_JOURNAL = 2 };

#endif
