/* C tests of the zero-copy lanes (ext/nbd_raw.c) against a fake NBD server
 * in a child process, which does what well-behaved servers rarely do at
 * once: answers out of order, dribbles reply heads and payloads a few bytes
 * at a time (so every splice, sendfile, send and recv of the client comes
 * up short or with EAGAIN), reads writes through a tiny socket buffer,
 * fails a request, or hangs up in the middle of a payload.  It speaks simple
 * replies, or structured replies with NBD_CMD_FLAG_DF honoured.
 * Real qemu-nbd and nbdkit runs are in tests/test_copy.py; the nbdkit ctest
 * (test_engine --nbd) covers the lanes against a real server too. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "vmferry.h"
#include "check.h"
#include "byteorder.h"

static char dir[] = "/tmp/vmferry-zctest-XXXXXX";

/* The fake disk's size; the one test that must fill socket buffers makes it
 * larger before it starts its servers (which inherit it). */
#define SMALL_SIZE ((2u << 20) + 12345)
static uint64_t image_size = SMALL_SIZE;
#define SIZE image_size

static uint8_t
pattern(uint64_t o)
{
  return (uint8_t)(o * 31 + (o >> 12) * 7 + 1);
}

/* ---- the fake server ---------------------------------------------------- */

struct behaviour {
  bool structured;            /* negotiate structured replies, answer reads with chunks */
  bool reorder;               /* answer what has arrived newest first */
  bool dribble;               /* heads and payloads in small pieces, slowly */
  bool tiny_rcvbuf;           /* reads writes through a 4 KiB socket buffer */
  int64_t fail_at;            /* this offset's request gets EIO; -1: none */
  int64_t hang_up_at;         /* close half-way through this read's payload */
  bool takes_32m;             /* advertises a 32 MiB maximum request, as QEMU does */
  bool expect_warm;           /* the first request must be one read of over 1 MiB */
  bool fail_first;            /* that first request gets EIO */
};

static bool
read_full(int fd, void *buf, size_t n)
{
  char *p = buf;
  while (n > 0) {
    ssize_t r = read(fd, p, n);
    if (r <= 0) {
      if (r < 0 && errno == EINTR)
        continue;
      return false;
    }
    p += r;
    n -= r;
  }
  return true;
}

static bool
write_full(int fd, const void *buf, size_t n, bool dribble)
{
  const char *p = buf;
  unsigned step = 0;
  while (n > 0) {
    size_t k = n;
    if (dribble) {
      k = 1 + (rand() % 3000);
      if (k > n)
        k = n;
      if (++step % 16 == 0)
        usleep(200);
    }
    ssize_t r = write(fd, p, k);
    if (r <= 0) {
      if (r < 0 && errno == EINTR)
        continue;
      return false;
    }
    p += r;
    n -= r;
  }
  return true;
}

static void
option_reply(int fd, uint32_t opt, uint32_t type, const void *data, uint32_t len)
{
  unsigned char h[20];
  put64(h, 0x3e889045565a9ULL);
  put32(h + 8, opt);
  put32(h + 12, type);
  put32(h + 16, len);
  write_full(fd, h, sizeof h, false);
  if (len)
    write_full(fd, data, len, false);
}

/* Newstyle fixed handshake up to NBD_OPT_GO.  False if the client left. */
static bool
handshake(int fd, const struct behaviour *b, bool writable)
{
  unsigned char buf[4096];
  memcpy(buf, "NBDMAGICIHAVEOPT", 16);
  put16(buf + 16, 3);                       /* FIXED_NEWSTYLE | NO_ZEROES */
  write_full(fd, buf, 18, false);
  if (!read_full(fd, buf, 4))
    return false;
  for (;;) {
    if (!read_full(fd, buf, 16))
      return false;
    uint32_t opt = get32(buf + 8), len = get32(buf + 12);
    if (len > sizeof buf || !read_full(fd, buf, len))
      return false;
    if (opt == 8 && b->structured) {        /* STRUCTURED_REPLY */
      option_reply(fd, opt, 1, NULL, 0);
    } else if (opt == 7 || opt == 6) {      /* GO, INFO */
      unsigned char info[12];
      uint16_t flags = 1 | (1 << 6) | (1 << 2);   /* HAS_FLAGS, WRITE_ZEROES, FLUSH */
      if (!writable)
        flags |= 2;                                /* READ_ONLY */
      if (b->structured)
        flags |= 1 << 7;                           /* SEND_DF */
      put16(info, 0);                              /* NBD_INFO_EXPORT */
      put64(info + 2, SIZE);
      put16(info + 10, flags);
      option_reply(fd, opt, 3, info, sizeof info);
      if (b->takes_32m) {
        unsigned char bs[14];
        put16(bs, 3);                              /* NBD_INFO_BLOCK_SIZE */
        put32(bs + 2, 1);
        put32(bs + 6, 4096);
        put32(bs + 10, 32u << 20);
        option_reply(fd, opt, 3, bs, sizeof bs);
      }
      option_reply(fd, opt, 1, NULL, 0);
      if (opt == 7)
        return true;
    } else if (opt == 2) {                  /* ABORT */
      return false;
    } else {
      option_reply(fd, opt, 0x80000001u, NULL, 0);   /* ERR_UNSUP */
    }
  }
}

struct request {
  uint16_t flags, type;
  uint64_t cookie, offset;
  uint32_t length;
};

static void
reply(int fd, const struct behaviour *b, const struct request *q, uint32_t err,
      const unsigned char *image)
{
  unsigned char h[32];
  bool payload = q->type == 0 && err == 0;

  if (b->structured && q->type == 0) {
    if (err) {                              /* NBD_REPLY_TYPE_ERROR, DONE */
      put32(h, 0x668e33efu);
      put16(h + 4, 1);
      put16(h + 6, 32769);
      put64(h + 8, q->cookie);
      put32(h + 16, 6);
      put32(h + 20, err);
      put16(h + 24, 0);
      write_full(fd, h, 26, b->dribble);
      return;
    }
    put32(h, 0x668e33efu);                  /* OFFSET_DATA, DONE */
    put16(h + 4, 1);
    put16(h + 6, 1);
    put64(h + 8, q->cookie);
    put32(h + 16, q->length + 8);
    put64(h + 20, q->offset);
    write_full(fd, h, 28, b->dribble);
  } else {
    put32(h, 0x67446698u);
    put32(h + 4, err);
    put64(h + 8, q->cookie);
    write_full(fd, h, 16, b->dribble);
  }
  if (!payload)
    return;
  if ((int64_t)q->offset == b->hang_up_at) {
    write_full(fd, image + q->offset, q->length / 2, b->dribble);
    _exit(0);
  }
  write_full(fd, image + q->offset, q->length, b->dribble);
}

/* Serves one connection; a destination's image goes to out at the end. */
static void
serve(int lfd, const struct behaviour *b, bool writable, const char *out)
{
  int fd = accept(lfd, NULL, NULL);
  unsigned char *image = calloc(1, SIZE);
  struct request pending[256];
  int npending = 0;
  unsigned nrequests = 0;

  if (fd < 0 || image == NULL)
    _exit(1);
  for (uint64_t o = 0; o < SIZE && !writable; o++)
    image[o] = pattern(o);
  if (!handshake(fd, b, writable))
    _exit(0);
  for (;;) {
    unsigned char h[28];
    struct pollfd p = { .fd = fd, .events = POLLIN };
    /* reordering: gather what has arrived, answer newest first */
    bool more = npending < 256 && (npending == 0 || !b->reorder ||
                                   poll(&p, 1, 5) == 1);
    if (more) {
      if (!read_full(fd, h, sizeof h))
        break;
      struct request q = { .flags = (uint16_t)(h[4] << 8 | h[5]),
                           .type = (uint16_t)(h[6] << 8 | h[7]),
                           .cookie = get64(h + 8), .offset = get64(h + 16),
                           .length = get32(h + 24) };
      if (get32(h) != 0x25609513u)
        _exit(2);
      if (q.type == 2)                      /* DISC */
        break;
      if (q.type == 1) {                    /* the payload comes with the header */
        if (q.offset + q.length > SIZE)
          _exit(3);
        size_t got = 0;
        while (got < q.length) {
          size_t k = b->tiny_rcvbuf ? 1024 : q.length - got;
          if (k > q.length - got)
            k = q.length - got;
          if (!read_full(fd, image + q.offset + got, k))
            _exit(0);   /* the client left mid-write: a test that expected that says so */
          got += k;
          if (b->tiny_rcvbuf && got % (64 * 1024) == 0)
            usleep(500);
        }
      } else if (q.type == 6) {
        memset(image + q.offset, 0, q.length);
      }
      if (b->structured && q.type == 0 && !(q.flags & (1 << 2)))
        _exit(5);                           /* a zero-copy read must ask for DF */
      if (b->expect_warm && nrequests == 0 && (q.type != 0 || q.length <= (1u << 20)))
        _exit(6);
      if (b->fail_first && nrequests == 0)
        q.flags |= 1 << 15;                 /* marks it for EIO below */
      nrequests++;
      pending[npending++] = q;
      if (b->reorder)
        continue;
    }
    while (npending > 0) {
      struct request q = pending[--npending];
      uint32_t err = (int64_t)q.offset == b->fail_at || (q.flags & (1 << 15)) ? 5 : 0;
      reply(fd, b, &q, err, image);
    }
  }
  if (out) {
    int ofd = open(out, O_CREAT | O_TRUNC | O_WRONLY, 0644);
    write_full(ofd, image, SIZE, false);
    close(ofd);
  }
  _exit(0);
}

static pid_t
start_server(const char *sock, const struct behaviour *b, bool writable,
             const char *out)
{
  struct sockaddr_un a = { .sun_family = AF_UNIX };
  int lfd = socket(AF_UNIX, SOCK_STREAM, 0);
  snprintf(a.sun_path, sizeof a.sun_path, "%s", sock);
  unlink(sock);
  if (b->tiny_rcvbuf) {
    int n = 4096;
    setsockopt(lfd, SOL_SOCKET, SO_RCVBUF, &n, sizeof n);
  }
  if (bind(lfd, (struct sockaddr *)&a, sizeof a) == -1 || listen(lfd, 4) == -1) {
    perror("fake server");
    exit(1);
  }
  pid_t pid = fork();
  if (pid == 0) {
    signal(SIGPIPE, SIG_IGN);
    alarm(60);
    serve(lfd, b, writable, out);
  }
  close(lfd);
  return pid;
}

static int
wait_server(pid_t pid)
{
  int st;
  if (waitpid(pid, &st, 0) != pid)
    return -1;
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/* ---- helpers ------------------------------------------------------------- */

static char *
path(const char *name)
{
  static char buf[8][256];
  static int i;
  char *p = buf[i++ % 8];
  snprintf(p, 256, "%s/%s", dir, name);
  return p;
}

static char *
uri_of(const char *sock)
{
  static char buf[4][300];
  static int i;
  char *p = buf[i++ % 4];
  snprintf(p, 300, "nbd+unix:///?socket=%s", sock);
  return p;
}

static bool
holds_pattern(const char *file)
{
  int fd = open(file, O_RDONLY);
  unsigned char *p = malloc(SIZE);
  bool ok = fd >= 0 && read(fd, p, SIZE) == (ssize_t)SIZE;
  for (uint64_t o = 0; ok && o < SIZE; o++)
    ok = p[o] == pattern(o);
  free(p);
  if (fd >= 0)
    close(fd);
  return ok;
}

static double
now(void)
{
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

/* What the last copy() reported as completed from the start. */
static uint64_t last_done_below;

static int
copy_with(const char *src, const char *dst, unsigned requests, uint32_t request_size,
          struct vf_error *err, int *zero_copy)
{
  struct vf_copy_config cfg = { .src = src, .dst = dst, .connections = 1,
                                .requests = requests, .request_size = request_size,
                                .zero_copy = VF_ZERO_COPY_ON, .flush = 1 };
  memset(err, 0, sizeof *err);
  struct vf_copy *c = vf_copy_open(&cfg, err);
  if (c == NULL)
    return -1;
  int r = vf_copy_run(c, err);
  struct vf_counters n;
  vf_copy_counters(c, &n);
  last_done_below = n.done_below;
  if (zero_copy)
    *zero_copy = vf_copy_zero_copy(c);
  vf_copy_close(c);
  return r;
}

static int
copy(const char *src, const char *dst, struct vf_error *err, int *zero_copy)
{
  return copy_with(src, dst, 8, 64 * 1024, err, zero_copy);
}

static void
make_pattern_file(const char *file)
{
  unsigned char *p = malloc(SIZE);
  for (uint64_t o = 0; o < SIZE; o++)
    p[o] = pattern(o);
  int fd = open(file, O_CREAT | O_TRUNC | O_WRONLY, 0644);
  if (write(fd, p, SIZE) != (ssize_t)SIZE)
    abort();
  close(fd);
  free(p);
}

/* ---- the tests ----------------------------------------------------------- */

/* file -> fake: sendfile and header sends come up short into a server
 * that reads through a 4 KiB buffer and answers late and out of order. */
static void
test_file_to_nbd(bool structured)
{
  struct behaviour b = { .structured = structured, .reorder = true, .dribble = true,
                         .tiny_rcvbuf = true, .fail_at = -1, .hang_up_at = -1 };
  struct vf_error err;
  int zc = 0;
  pid_t pid = start_server(path("d.sock"), &b, true, path("d.img"));
  int r = copy(path("src"), uri_of(path("d.sock")), &err, &zc);
  CHECK(r == 0 && zc, "file -> nbd (structured %d): %s", structured, err.msg);
  CHECK(wait_server(pid) == 0, "the fake destination failed");
  CHECK(holds_pattern(path("d.img")), "file -> nbd: the destination differs");
  CHECK(last_done_below == SIZE, "done_below %llu after a whole copy",
        (unsigned long long)last_done_below);
}

/* fake -> file and fake -> fake: replies out of order, in pieces, spliced
 * on through the pipe a few bytes at a time. */
static void
test_nbd_to_file_and_nbd(bool structured)
{
  struct behaviour src = { .structured = structured, .reorder = true, .dribble = true,
                           .fail_at = -1, .hang_up_at = -1 };
  struct behaviour dst = { .structured = structured, .reorder = true, .dribble = true,
                           .tiny_rcvbuf = true, .fail_at = -1, .hang_up_at = -1 };
  struct vf_error err;
  int zc = 0;

  pid_t s = start_server(path("s.sock"), &src, false, NULL);
  unlink(path("out"));
  int r = copy(uri_of(path("s.sock")), path("out"), &err, &zc);
  CHECK(r == 0 && zc, "nbd -> file (structured %d): %s", structured, err.msg);
  CHECK(wait_server(s) == 0, "the fake source failed");
  CHECK(holds_pattern(path("out")), "nbd -> file: the file differs");

  s = start_server(path("s.sock"), &src, false, NULL);
  pid_t d = start_server(path("d.sock"), &dst, true, path("d.img"));
  r = copy(uri_of(path("s.sock")), uri_of(path("d.sock")), &err, &zc);
  CHECK(r == 0 && zc, "nbd -> nbd (structured %d): %s", structured, err.msg);
  CHECK(last_done_below == SIZE, "done_below %llu after a whole copy",
        (unsigned long long)last_done_below);
  CHECK(wait_server(s) == 0 && wait_server(d) == 0, "a fake server failed");
  CHECK(holds_pattern(path("d.img")), "nbd -> nbd: the destination differs");
}

/* An error reply fails the copy with that error, and promptly: nothing
 * waits for the drain timeout. */
static void
test_error_replies(bool structured)
{
  struct behaviour src = { .structured = structured, .reorder = true,
                           .fail_at = 1 << 20, .hang_up_at = -1 };
  struct behaviour dst = { .structured = structured, .fail_at = -1, .hang_up_at = -1 };
  struct behaviour bad_dst = { .structured = structured, .fail_at = 512 * 1024,
                               .hang_up_at = -1 };
  struct vf_error err;

  for (int to_nbd = 0; to_nbd < 2; to_nbd++) {
    pid_t s = start_server(path("s.sock"), &src, false, NULL);
    pid_t d = to_nbd ? start_server(path("d.sock"), &dst, true, NULL) : 0;
    unlink(path("out"));
    double t0 = now();
    int r = copy(uri_of(path("s.sock")), to_nbd ? uri_of(path("d.sock")) : path("out"),
                 &err, NULL);
    CHECK(r == -1 && err.kind == VF_ERR_IO && err.errnum == EIO &&
          strstr(err.msg, "reading from") && strstr(err.msg, "1048576"),
          "a read error (to nbd %d, structured %d): %d %s", to_nbd, structured,
          err.errnum, err.msg);
    CHECK(now() - t0 < 5, "a failed copy took %.1f s", now() - t0);
    CHECK(last_done_below <= 1 << 20, "done_below %llu passes the failed read",
          (unsigned long long)last_done_below);
    CHECK(wait_server(s) == 0, "the fake source failed");
    if (d)
      CHECK(wait_server(d) == 0, "the fake destination failed");
  }

  pid_t d = start_server(path("d.sock"), &bad_dst, true, NULL);
  int r = copy(path("src"), uri_of(path("d.sock")), &err, NULL);
  CHECK(r == -1 && err.errnum == EIO && strstr(err.msg, "writing to"),
        "a write error: %s", err.msg);
  CHECK(wait_server(d) == 0, "the fake destination failed");
}

/* A source that hangs up in the middle of a payload: the read fails, and so
 * does the destination write already fed from the pipe, at once. */
static void
test_hang_up_mid_payload(bool structured)
{
  struct behaviour src = { .structured = structured, .dribble = true, .fail_at = -1,
                           .hang_up_at = 768 * 1024 };
  struct behaviour dst = { .structured = structured, .fail_at = -1, .hang_up_at = -1 };
  struct vf_error err;

  for (int to_nbd = 0; to_nbd < 2; to_nbd++) {
    pid_t s = start_server(path("s.sock"), &src, false, NULL);
    pid_t d = to_nbd ? start_server(path("d.sock"), &dst, true, NULL) : 0;
    unlink(path("out"));
    double t0 = now();
    int r = copy(uri_of(path("s.sock")), to_nbd ? uri_of(path("d.sock")) : path("out"),
                 &err, NULL);
    CHECK(r == -1 && err.kind == VF_ERR_IO, "a hang-up (to nbd %d, structured %d): %s",
          to_nbd, structured, err.msg);
    CHECK(now() - t0 < 5, "a copy from a dead server took %.1f s", now() - t0);
    CHECK(wait_server(s) == 0, "the fake source failed");
    if (d)
      CHECK(wait_server(d) == 0, "the fake destination failed");
  }
}

/* More in flight (32 x 1 MiB) than the client's socket buffers hold, into a
 * server that reads slowly: every sendfile, header send and splice into the
 * socket comes up short or with EAGAIN at some point. */
static void
test_full_socket_buffers(void)
{
  struct behaviour src = { .fail_at = -1, .hang_up_at = -1 };
  struct behaviour slow = { .tiny_rcvbuf = true, .fail_at = -1, .hang_up_at = -1 };
  struct vf_error err;
  int zc = 0;

  image_size = 40u << 20;
  make_pattern_file(path("big"));
  pid_t d = start_server(path("d.sock"), &slow, true, path("d.img"));
  int r = copy_with(path("big"), uri_of(path("d.sock")), 32, 1 << 20, &err, &zc);
  CHECK(r == 0 && zc, "file -> slow nbd: %s", err.msg);
  CHECK(wait_server(d) == 0, "the fake destination failed");
  CHECK(holds_pattern(path("d.img")), "file -> slow nbd: the destination differs");

  pid_t s = start_server(path("s.sock"), &src, false, NULL);
  d = start_server(path("d.sock"), &slow, true, path("d.img"));
  r = copy_with(uri_of(path("s.sock")), uri_of(path("d.sock")), 32, 1 << 20, &err, &zc);
  CHECK(r == 0 && zc, "nbd -> slow nbd: %s", err.msg);
  CHECK(wait_server(s) == 0 && wait_server(d) == 0, "a fake server failed");
  CHECK(holds_pattern(path("d.img")), "nbd -> slow nbd: the destination differs");
  image_size = SMALL_SIZE;
}

/* A server that takes 32 MiB requests gets one large read before anything
 * else, its answer (dribbled, simple or in chunks) thrown away whole so the
 * stream stays in step; one that fails it still takes the copy.  Requests
 * of the default size: an explicit one leaves the read out. */
static void
test_first_large_read(bool structured)
{
  struct vf_error err;
  int zc = 0;
  for (int fail = 0; fail < 2; fail++) {
    struct behaviour b = { .structured = structured, .reorder = true, .dribble = true,
                           .fail_at = -1, .hang_up_at = -1, .takes_32m = true,
                           .expect_warm = true, .fail_first = fail };
    pid_t d = start_server(path("d.sock"), &b, true, path("d.img"));
    int r = copy_with(path("src"), uri_of(path("d.sock")), 8, 0, &err, &zc);
    CHECK(r == 0 && zc, "file -> nbd after a large read (structured %d, failed %d): %s",
          structured, fail, err.msg);
    CHECK(wait_server(d) == 0, "the fake destination saw no large read first "
          "(structured %d, failed %d)", structured, fail);
    CHECK(holds_pattern(path("d.img")), "file -> nbd after a large read: the "
          "destination differs");

    pid_t s = start_server(path("s.sock"), &b, false, NULL);
    unlink(path("out"));
    r = copy_with(uri_of(path("s.sock")), path("out"), 8, 0, &err, &zc);
    CHECK(r == 0 && zc, "nbd -> file after a large read (structured %d, failed %d): %s",
          structured, fail, err.msg);
    CHECK(wait_server(s) == 0, "the fake source saw no large read first");
    CHECK(holds_pattern(path("out")), "nbd -> file after a large read: the file differs");
  }

  /* A server that hangs up in the middle of that read's answer: the copy
   * fails at once saying so, rather than taking the stream as in step. */
  struct behaviour gone = { .structured = structured, .dribble = true, .fail_at = -1,
                            .hang_up_at = 0, .takes_32m = true };
  pid_t d = start_server(path("d.sock"), &gone, true, NULL);
  double t0 = now();
  int r = copy_with(path("src"), uri_of(path("d.sock")), 8, 0, &err, &zc);
  CHECK(r == -1 && err.kind == VF_ERR_IO && strstr(err.msg, "closed the connection"),
        "a hang-up in the first read (structured %d): %s", structured, err.msg);
  CHECK(now() - t0 < 5, "a hang-up in the first read took %.1f s", now() - t0);
  CHECK(wait_server(d) == 0, "the fake destination failed");
}

/* A real server (nbdkit, from ctest): zero-copy both ways, and off. */
static void
test_real_server(const char *uri)
{
  struct vf_error err;
  int zc = 0;
  CHECK(copy(path("src"), uri, &err, &zc) == 0 && zc, "to %s: %s", uri, err.msg);
  unlink(path("back"));
  CHECK(copy(uri, path("back"), &err, &zc) == 0 && zc, "from %s: %s", uri, err.msg);
  CHECK(holds_pattern(path("back")), "the round trip through %s differs", uri);

  struct vf_copy_config off = { .src = uri, .dst = path("back2"),
                                .zero_copy = VF_ZERO_COPY_OFF };
  unlink(path("back2"));
  memset(&err, 0, sizeof err);
  struct vf_copy *c = vf_copy_open(&off, &err);
  CHECK(c && vf_copy_run(c, &err) == 0 && !vf_copy_zero_copy(c), "off: %s", err.msg);
  vf_copy_close(c);
  CHECK(holds_pattern(path("back2")), "libnbd lanes differ");
}

int
main(int argc, char **argv)
{
  signal(SIGPIPE, SIG_IGN);
  alarm(120);     /* a stream out of step hangs rather than fails: fail it */
  srand(12);
  if (mkdtemp(dir) == NULL) {
    perror("mkdtemp");
    return 1;
  }
  make_pattern_file(path("src"));
  if (argc == 3 && strcmp(argv[1], "--nbd") == 0) {
    test_real_server(argv[2]);
  } else {
    for (int structured = 0; structured < 2; structured++) {
      test_file_to_nbd(structured);
      test_nbd_to_file_and_nbd(structured);
      test_error_replies(structured);
      test_hang_up_mid_payload(structured);
      test_first_large_read(structured);
    }
    test_full_socket_buffers();
  }
  return finish(dir);
}
