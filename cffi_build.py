"""Builds btt_core._btt_cffi, the C engine's Python binding (cffi API mode, out of line).

The C sources stay real .c/.h files under btt_core/; this file only lists what Python may
call. Set BTT_SANITIZE=1 to build with AddressSanitizer and UBSan (the fuzz tests do).
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["btt.c", "check.c", "backend.c", "crc32c.c"]

CDEF = """
struct btt_io;
struct btt;

int btt_file_open(const char *path, int readonly, int create, uint64_t min_size, struct btt_io **out);
struct btt_io *btt_mem_new(uint64_t size);
struct btt_io *btt_mem_clone(struct btt_io *mem);
void btt_io_destroy(struct btt_io *io);
int btt_io_read(struct btt_io *io, void *buf, size_t len, uint64_t off);
int btt_io_write(struct btt_io *io, const void *buf, size_t len, uint64_t off);
int btt_io_sync(struct btt_io *io);
uint64_t btt_io_size(struct btt_io *io);

enum { BTT_REC_WRITE = 1, BTT_REC_SYNC = 2 };
int btt_mem_set_recording(struct btt_io *mem, int on);
size_t btt_mem_record_count(struct btt_io *mem);
int btt_mem_record_get(struct btt_io *mem, size_t i, int *kind, uint64_t *seq, uint64_t *off,
                       uint64_t *len);
uint64_t btt_mem_record_clock(void);
int btt_mem_record_data(struct btt_io *mem, size_t i, void *buf, size_t len);
void btt_mem_record_clear(struct btt_io *mem);
int btt_mem_poke(struct btt_io *mem, const void *buf, size_t len, uint64_t off);
int btt_mem_fail_sync(struct btt_io *mem, int err);

struct btt_info {
    uint8_t signature[16];
    uint8_t uuid[16];
    uint8_t parent_uuid[16];
    uint32_t flags;
    uint16_t version_major;
    uint16_t version_minor;
    uint32_t external_lbasize;
    uint32_t external_nlba;
    uint32_t internal_lbasize;
    uint32_t internal_nlba;
    uint32_t nfree;
    uint32_t infosize;
    uint64_t nextoff;
    uint64_t dataoff;
    uint64_t mapoff;
    uint64_t logoff;
    uint64_t info2off;
    uint64_t checksum;
};
uint64_t btt_fletcher64(const void *buf, size_t len);
void btt_info_pack(struct btt_info *info, uint8_t out[4096]);
void btt_info_unpack(const uint8_t in[4096], struct btt_info *info, int *checksum_ok);
int btt_lbasize_supported(uint32_t lbasize);
uint32_t btt_internal_lbasize(uint32_t lbasize);

struct btt_arena_layout {
    uint64_t start;
    uint64_t size;
    uint64_t lba_start;
    uint32_t external_nlba;
    uint32_t internal_nlba;
    uint32_t internal_lbasize;
    uint32_t nfree;
    uint64_t dataoff, mapoff, logoff, info2off, nextoff;
};
int btt_compute_layout(uint64_t rawsize, uint32_t lbasize, uint64_t arena_max,
                       struct btt_arena_layout *out, int max);

enum btt_durability { BTT_DUR_GROUP = 0, BTT_DUR_STRICT = 1, BTT_DUR_NONE = 2 };
struct btt_format_params {
    uint64_t ns_offset;
    uint64_t ns_size;
    uint32_t lbasize;
    uint16_t version_major;
    uint16_t version_minor;
    uint8_t uuid[16];
    uint8_t parent_uuid[16];
    uint64_t arena_max;
};
struct btt_open_params {
    uint64_t ns_offset;
    uint64_t ns_size;
    int version;
    int check_parent;
    uint8_t parent_uuid[16];
    int readonly;
    int durability;
    struct btt_io *journal;
    uint8_t boot_id[16];
};
int btt_format(struct btt_io *io, const struct btt_format_params *p);
int btt_open(struct btt_io *io, const struct btt_open_params *p, struct btt **out);
int btt_close(struct btt *b);
int btt_read(struct btt *b, uint64_t lba, uint64_t count, void *buf);
int btt_write(struct btt *b, uint64_t lba, uint64_t count, const void *buf, int flags);
int btt_write_zeroes(struct btt *b, uint64_t lba, uint64_t count, int flags);
int btt_set_zero(struct btt *b, uint64_t lba, uint64_t count, int flags);
int btt_flush(struct btt *b);
int btt_start_timer(struct btt *b, unsigned interval_ms);
#define BTT_FUA 1
uint64_t btt_nlba(struct btt *b);
uint32_t btt_sector_size(struct btt *b);
uint32_t btt_lbasize(struct btt *b);
int btt_narenas(struct btt *b);
int btt_arena_info(struct btt *b, int i, struct btt_info *info, struct btt_arena_layout *lay);
int btt_flog_scheme(struct btt *b, int arena, int *idx0, int *idx1);
struct btt_stats {
    uint64_t writes;
    uint64_t commits;
    uint64_t syncs;
    uint64_t journal_replayed;
    uint64_t redo_applied;
};
void btt_get_stats(struct btt *b, struct btt_stats *s);
struct btt_check_result {
    uint64_t blocks;
    uint64_t out_of_range;
    uint64_t duplicates;
    uint64_t unreferenced;
    uint64_t error_entries;
    uint64_t zero_entries;
};
int btt_check(struct btt *b, struct btt_check_result *r, char *msgbuf, size_t msglen);
struct btt_check_opts {
    uint64_t ns_offset, ns_size;
    int version;
    int repair;
    int rewrite_log;
    void (*progress)(void *ctx, int arena, uint64_t done, uint64_t total);
    void *ctx;
};
struct btt_check_summary {
    int found;
    int version;
    int narenas;
    uint32_t lbasize;
    uint64_t nlba;
    uint64_t errors;
    uint64_t repaired;
};
int btt_check_offline(struct btt_io *io, const struct btt_check_opts *o,
                      struct btt_check_summary *sum, char *report, size_t len);
extern "Python" void _check_progress(void *ctx, int arena, uint64_t done, uint64_t total);
enum { BTT_MUT_NONE = 0, BTT_MUT_MAP_BEFORE_FLOG = 1, BTT_MUT_FLOG_BEFORE_DATA_DURABLE = 2,
       BTT_MUT_REUSE_BEFORE_COMMIT = 3 };
extern int btt_test_mutation;
int btt_debug_set_map_flags(struct btt *b, uint64_t lba, uint32_t flags);
const char *btt_errmsg(void);
uint32_t btt_crc32c(uint32_t crc, const void *buf, size_t len);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)

_flags = ["-O2", "-g", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-pthread"]
_link = ["-pthread"]
if os.environ.get("BTT_SANITIZE"):
    _flags += ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
               "-fno-omit-frame-pointer", "-O1"]
    _link += ["-fsanitize=address,undefined"]

ffibuilder.set_source(
    "btt_core._btt_cffi",
    '#include "btt.h"',
    # pip wants paths relative to the project; ffibuilder.compile() (the sanitizer test's
    # direct build) changes directory first, so it needs them absolute.
    sources=[os.path.join(HERE if os.environ.get("BTT_SANITIZE") else "", "btt_core", s)
             for s in SOURCES],
    include_dirs=[os.path.join(HERE, "btt_core")],
    extra_compile_args=_flags,
    extra_link_args=_link,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
