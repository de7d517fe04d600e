/* C unit tests for the copy engine, run by ctest (under ASan/UBSan by
 * `make test`).  Without arguments they copy between local files; with
 * --nbd URI they also copy to and from a real nbdkit server. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "vmferry.h"
#include "check.h"

static char dir[] = "/tmp/vmferry-ctest-XXXXXX";

static char *
path(const char *name)
{
  static char buf[8][256];
  static int i;
  char *p = buf[i++ % 8];
  snprintf(p, 256, "%s/%s", dir, name);
  return p;
}

/* A source with data, a zero-filled block and a hole, of an odd size. */
static size_t
make_source(const char *file, size_t size)
{
  char *data = malloc(size);
  for (size_t i = 0; i < size; i++)
    data[i] = (char)(i * 7 + i / 4096);
  memset(data + size / 3, 0, size / 5);         /* zero data */
  int fd = open(file, O_CREAT | O_TRUNC | O_WRONLY, 0644);
  if (write(fd, data, size) != (ssize_t)size)
    abort();
  /* a real hole in the second half */
  fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, size / 2 + 8192, 1 << 20);
  close(fd);
  free(data);
  return size;
}

static char *
slurp(const char *file, size_t *len)
{
  struct stat st;
  int fd = open(file, O_RDONLY);
  if (fd == -1 || fstat(fd, &st) == -1)
    return NULL;
  char *p = malloc(st.st_size + 1);
  if (read(fd, p, st.st_size) != st.st_size)
    abort();
  close(fd);
  *len = st.st_size;
  return p;
}

static int
run_copy(struct vf_copy_config *cfg, struct vf_error *err, struct vf_counters *n)
{
  memset(err, 0, sizeof *err);
  struct vf_copy *c = vf_copy_open(cfg, err);
  if (c == NULL)
    return -1;
  int r = vf_copy_run(c, err);
  if (n)
    vf_copy_counters(c, n);
  vf_copy_close(c);
  return r;
}

static void
expect_same(const char *a, const char *b)
{
  size_t la, lb;
  char *pa = slurp(a, &la), *pb = slurp(b, &lb);
  CHECK(pa && pb && la == lb && memcmp(pa, pb, la) == 0, "%s and %s differ", a, b);
  free(pa);
  free(pb);
}

static void
test_file_copies(void)
{
  static const struct { unsigned conns, reqs; uint32_t rsize; } settings[] = {
    { 1, 1, 4096 }, { 4, 64, 256 * 1024 }, { 2, 8, 1 << 20 }, { 3, 5, 512 },
  };
  size_t size = make_source(path("src"), (3 << 20) + 123);

  /* both lanes: copy_file_range (zero-copy) and buffers (libnbd's kind) */
  for (size_t k = 0; k < 2 * sizeof settings / sizeof settings[0]; k++) {
    size_t i = k / 2;
    struct vf_copy_config cfg = {
      .src = path("src"), .dst = path("dst"), .connections = settings[i].conns,
      .requests = settings[i].reqs, .request_size = settings[i].rsize,
      .zero_copy = k % 2 ? VF_ZERO_COPY_OFF : VF_ZERO_COPY_ON,
    };
    struct vf_error err;
    struct vf_counters n;
    unlink(path("dst"));
    int r = run_copy(&cfg, &err, &n);
    CHECK(r == 0, "copy %zu (zero-copy %d) failed: %s", i, cfg.zero_copy, err.msg);
    expect_same(path("src"), path("dst"));
    CHECK(n.total == size, "total %llu", (unsigned long long)n.total);
    CHECK(n.written + n.zeroed + n.skipped == size, "counters do not add up");
    CHECK(n.zeroed > 0, "zero data and the hole should become zero requests");
  }
}

static void
test_destination_is_zero_and_allocated(void)
{
  struct vf_error err;
  struct vf_counters n;
  struct vf_copy_config cfg = { .src = path("src"), .dst = path("dz"),
                                .destination_is_zero = 1 };
  unlink(path("dz"));
  CHECK(run_copy(&cfg, &err, &n) == 0, "%s", err.msg);
  CHECK(n.zeroed == 0 && n.skipped > 0, "zeroes should be skipped");
  expect_same(path("src"), path("dz"));

  struct vf_copy_config alloc = { .src = path("src"), .dst = path("da"), .allocated = 1 };
  unlink(path("da"));
  CHECK(run_copy(&alloc, &err, &n) == 0, "%s", err.msg);
  expect_same(path("src"), path("da"));
  struct stat st;
  stat(path("da"), &st);
  CHECK((uint64_t)st.st_blocks * 512 >= (uint64_t)st.st_size,
        "--allocated left holes: %lld blocks for %lld bytes",
        (long long)st.st_blocks, (long long)st.st_size);
}

static void
test_bad_input(void)
{
  struct vf_error err;
  struct vf_copy_config cfg = { .src = path("src"), .dst = path("x"), .request_size = 1000 };
  CHECK(run_copy(&cfg, &err, NULL) == -1 && err.kind == VF_ERR_USAGE, "request size");

  struct vf_copy_config both = { .src = path("src"), .dst = path("x"), .allocated = 1,
                                 .destination_is_zero = 1 };
  CHECK(run_copy(&both, &err, NULL) == -1 && err.kind == VF_ERR_USAGE, "flags");

  struct vf_copy_config nullsrc = { .src = "null:", .dst = path("x") };
  CHECK(run_copy(&nullsrc, &err, NULL) == -1 && err.kind == VF_ERR_USAGE, "null source");

  struct vf_copy_config scheme = { .src = "http://example/disk", .dst = path("x") };
  CHECK(run_copy(&scheme, &err, NULL) == -1 && err.kind == VF_ERR_USAGE &&
        strstr(err.msg, "unsupported URI"), "scheme: %s", err.msg);

  int fd = open(path("small"), O_CREAT | O_TRUNC | O_WRONLY, 0644);
  ftruncate(fd, 4096);
  close(fd);
  struct vf_copy_config small = { .src = path("src"), .dst = path("small") };
  CHECK(run_copy(&small, &err, NULL) == -1 && err.kind == VF_ERR_ENDPOINT &&
        strstr(err.msg, "smaller"), "small destination: %s", err.msg);

  CHECK(access(path("x"), F_OK) == -1, "a failed copy left a destination file behind");
}

static void
test_cancel_and_null(void)
{
  struct vf_error err = { 0 };
  struct vf_copy_config cfg = { .src = path("src"), .dst = path("cancelled") };
  unlink(path("cancelled"));
  struct vf_copy *c = vf_copy_open(&cfg, &err);
  CHECK(c != NULL, "%s", err.msg);
  vf_copy_cancel(c);
  CHECK(vf_copy_run(c, &err) == -1 && err.kind == VF_ERR_CANCELLED, "cancel: %s", err.msg);
  vf_copy_close(c);
  CHECK(access(path("cancelled"), F_OK) == -1, "cancelled copy left its file");

  struct vf_counters n;
  struct vf_copy_config null = { .src = path("src"), .dst = "null:" };
  CHECK(run_copy(&null, &err, &n) == 0 && n.written > 0, "null: %s", err.msg);
}

static double
seconds_since(const struct timespec *t0)
{
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)(t.tv_sec - t0->tv_sec) + (t.tv_nsec - t0->tv_nsec) / 1e9;
}

static void *
cancel_soon(void *c)
{
  usleep(200 * 1000);
  vf_copy_cancel(c);
  return NULL;
}

/* 6 MiB of data at 8 MiB/s over four connections in two threads, which share
 * one limit: at least 0.75 s less the 0.1 s the engine may issue ahead. */
static void
test_rate_limit(void)
{
  const size_t size = 6 << 20;
  char *data = malloc(size);
  for (size_t i = 0; i < size; i++)
    data[i] = (char)(i % 251 + 1);
  int fd = open(path("dense"), O_CREAT | O_TRUNC | O_WRONLY, 0644);
  if (write(fd, data, size) != (ssize_t)size)
    abort();
  close(fd);
  free(data);

  struct vf_error err = { 0 };
  struct vf_counters n;
  struct vf_copy_config cfg = { .src = path("dense"), .dst = path("paced"),
                                .connections = 4, .threads = 2,
                                .request_size = 64 << 10, .rate = 8 << 20 };
  unlink(path("paced"));
  struct timespec t0;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  CHECK(run_copy(&cfg, &err, &n) == 0, "%s", err.msg);
  double took = seconds_since(&t0);
  CHECK(took >= 0.6, "6 MiB at 8 MiB/s took only %.2f s", took);
  CHECK(took < 5, "6 MiB at 8 MiB/s took %.2f s", took);
  expect_same(path("dense"), path("paced"));

  /* a copy waiting on its limit (here: hours for the second request) still
   * stops at once when cancelled */
  cfg.dst = "null:";
  cfg.rate = 1024;
  struct vf_copy *c = vf_copy_open(&cfg, &err);
  CHECK(c != NULL, "%s", err.msg);
  pthread_t canceller;
  pthread_create(&canceller, NULL, cancel_soon, c);
  clock_gettime(CLOCK_MONOTONIC, &t0);
  CHECK(vf_copy_run(c, &err) == -1 && err.kind == VF_ERR_CANCELLED, "%s", err.msg);
  CHECK(seconds_since(&t0) < 2, "a cancelled paced copy took %.2f s", seconds_since(&t0));
  pthread_join(canceller, NULL);
  vf_copy_close(c);
}

/* A part of the source, and what a copy that stopped early leaves valid:
 * done_below must never claim a byte that was not written. */
static void
test_range_and_done_below(void)
{
  const size_t size = 8 << 20;
  char *data = malloc(size);
  for (size_t i = 0; i < size; i++)
    data[i] = (char)(i % 241 + 1);
  int fd = open(path("ranged"), O_CREAT | O_TRUNC | O_WRONLY, 0644);
  if (write(fd, data, size) != (ssize_t)size)
    abort();
  close(fd);

  struct vf_error err = { 0 };
  struct vf_counters n;
  struct vf_copy_config cfg = { .src = path("ranged"), .dst = path("part"),
                                .connections = 2, .request_size = 64 << 10,
                                .range_start = 1 << 20, .range_end = 5 << 20 };
  unlink(path("part"));
  CHECK(run_copy(&cfg, &err, &n) == 0, "%s", err.msg);
  CHECK(n.total == 4 << 20 && n.done_below == 5 << 20, "total %llu, done below %llu",
        (unsigned long long)n.total, (unsigned long long)n.done_below);
  size_t len;
  char *back = slurp(path("part"), &len);
  char zero[1 << 20] = { 0 };
  CHECK(back && len == size && memcmp(back + (1 << 20), data + (1 << 20), 4 << 20) == 0 &&
        memcmp(back, zero, 1 << 20) == 0 && memcmp(back + (5 << 20), zero, 1 << 20) == 0,
        "only 1-5 MiB should have been copied");
  free(back);

  struct vf_copy_config bad = cfg;
  bad.range_end = size + 1;
  CHECK(run_copy(&bad, &err, NULL) == -1 && err.kind == VF_ERR_USAGE, "range past the end");

  /* paced at 4 MiB/s and cancelled after 0.2 s: something, not all, is done,
   * and all of it really is in the destination */
  struct vf_copy_config slow = { .src = path("ranged"), .dst = path("stopped"),
                                 .connections = 4, .threads = 2,
                                 .request_size = 64 << 10, .rate = 4 << 20 };
  fd = open(path("stopped"), O_CREAT | O_TRUNC | O_WRONLY, 0644);
  if (ftruncate(fd, size) == -1)
    abort();
  close(fd);
  struct vf_copy *c = vf_copy_open(&slow, &err);
  CHECK(c != NULL, "%s", err.msg);
  pthread_t canceller;
  pthread_create(&canceller, NULL, cancel_soon, c);
  CHECK(vf_copy_run(c, &err) == -1 && err.kind == VF_ERR_CANCELLED, "%s", err.msg);
  pthread_join(canceller, NULL);
  vf_copy_counters(c, &n);
  vf_copy_close(c);
  CHECK(n.done_below < size, "a cancelled copy claims it is all done");
  CHECK(n.done_below <= n.written, "done below %llu, but only %llu written",
        (unsigned long long)n.done_below, (unsigned long long)n.written);
  back = slurp(path("stopped"), &len);
  CHECK(back && memcmp(back, data, n.done_below) == 0,
        "bytes below done_below (%llu) were not copied", (unsigned long long)n.done_below);
  free(back);
  free(data);
}

static void
test_nbd(const char *uri)
{
  struct vf_error err = { 0 };
  struct vf_counters n;
  size_t len;

  /* file -> nbd -> file, then the two files must match */
  struct vf_copy_config up = { .src = path("src"), .dst = uri, .connections = 2 };
  CHECK(run_copy(&up, &err, &n) == 0, "to nbd: %s", err.msg);
  unlink(path("back"));
  struct vf_copy_config down = { .src = uri, .dst = path("back") };
  CHECK(run_copy(&down, &err, &n) == 0, "from nbd: %s", err.msg);
  char *src = slurp(path("src"), &len);
  size_t blen;
  char *back = slurp(path("back"), &blen);
  CHECK(back && blen >= len && memcmp(src, back, len) == 0, "nbd round trip differs");
  free(src);
  free(back);

  /* the buffer API reads exactly what was written */
  struct vf_endpoint *ep = vf_endpoint_open(uri, 1, &err);
  CHECK(ep != NULL, "%s", err.msg);
  if (ep) {
    char out[1000], in[1000];
    for (int i = 0; i < 1000; i++)
      out[i] = (char)(i ^ 0x5a);
    CHECK(vf_endpoint_pwrite(ep, out, sizeof out, 12345, &err) == 0, "%s", err.msg);
    CHECK(vf_endpoint_pread(ep, in, sizeof in, 12345, &err) == 0, "%s", err.msg);
    CHECK(memcmp(in, out, sizeof in) == 0, "endpoint read back differs");
    memset(&err, 0, sizeof err);
    CHECK(vf_endpoint_pread(ep, in, sizeof in, vf_endpoint_size(ep) - 10, &err) == -1 &&
          err.kind == VF_ERR_USAGE, "read past the end must fail");
    vf_endpoint_close(ep);
  }

  /* bytes from a file, what to copy from the server's block status: every
   * worker opens its own extents connection, and all of them are closed.
   * The file differs from the export where the export has data (the copy
   * must take the file's bytes) and where it has never been written, which
   * it reports as zero (the copy must write zeroes, not the file's bytes). */
  int fd = open(path("back"), O_WRONLY);
  char marks[4096];
  memset(marks, 0x55, sizeof marks);
  CHECK(pwrite(fd, marks, sizeof marks, 4096) == (ssize_t)sizeof marks, "pwrite");
  memset(marks, 0xaa, sizeof marks);
  CHECK(pwrite(fd, marks, sizeof marks, 4 << 20) == (ssize_t)sizeof marks, "pwrite");
  close(fd);
  unlink(path("ext"));
  struct vf_copy_config ext = { .src = path("back"), .dst = path("ext"),
                                .extents_from = uri, .connections = 3, .threads = 2 };
  CHECK(run_copy(&ext, &err, &n) == 0, "extents_from: %s", err.msg);
  size_t elen;
  char *got = slurp(path("ext"), &elen);
  CHECK(got && elen == blen && (unsigned char)got[4096] == 0x55 &&
        (unsigned char)got[4096 + 4095] == 0x55, "data must come from the file");
  CHECK(got && got[4 << 20] == 0 && got[(4 << 20) + 4095] == 0,
        "a range the export reports as zero must be written as zeroes");
  free(got);
  /* extents of a disk of another size would copy the wrong blocks */
  struct vf_copy_config other = { .src = path("src"), .dst = path("x"), .extents_from = uri };
  memset(&err, 0, sizeof err);
  CHECK(run_copy(&other, &err, NULL) == -1 && err.kind == VF_ERR_ENDPOINT &&
        strstr(err.msg, "not the same disk"), "extents_from size: %s", err.msg);
  CHECK(access(path("x"), F_OK) == -1, "a refused copy left its destination behind");

  struct vf_copy_config bitmap = { .src = uri, .dst = path("b"), .bitmap = "nope" };
  CHECK(run_copy(&bitmap, &err, NULL) == -1 && strstr(err.msg, "bitmap"),
        "missing bitmap: %s", err.msg);
}

int
main(int argc, char **argv)
{
  if (mkdtemp(dir) == NULL) {
    perror("mkdtemp");
    return 1;
  }
  if (argc == 3 && strcmp(argv[1], "--nbd") == 0) {
    make_source(path("src"), (3 << 20) + 123);
    test_nbd(argv[2]);
  } else {
    test_file_copies();
    test_destination_is_zero_and_allocated();
    test_bad_input();
    test_cancel_and_null();
    test_rate_limit();
    test_range_and_done_below();
  }
  return finish(dir);
}
