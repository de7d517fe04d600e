/* NBD data commands spoken on the socket itself, for zero-copy lanes: a
 * write's payload goes from a source file with sendfile(), or from a pipe
 * that a source connection fills with splice(); a read's payload is spliced
 * from the socket into that pipe, or through it into a destination file.
 * The bytes never enter this process.
 *
 * The handshake is libnbd's.  Option haggling (URI forms, export names, TLS
 * refusal, NBD_OPT_GO, block sizes, meta contexts) is most of the protocol
 * and none of the data path, so libnbd connects, and once it is ready we
 * drive nbd_aio_get_fd() ourselves and never issue another libnbd command on
 * that handle (its idea of the stream ends with the handshake; nbd_close()
 * then only closes the socket).  Structured replies are kept, not turned
 * off: before the first data command the same handle answers block status
 * (base:allocation or a dirty bitmap), so the copy plans from extents
 * without a second connection, which a server serving one client (qemu-nbd
 * without -e) would never accept.  Reads carry NBD_CMD_FLAG_DF, so a server
 * answers each with one OFFSET_DATA chunk whose fixed 28-byte head is
 * followed by exactly the payload, which is as easy to splice as a simple
 * reply.  Servers without structured replies answer with simple replies;
 * both forms are parsed.  A simple reply does not carry its length and
 * qemu-nbd answers out of order, so every connection keeps a table from
 * cookie to the command that asked.
 *
 * Each connection belongs to one worker thread, as in nbd_ops.c, so nothing
 * here takes a lock; a pipe is shared only by the two connections of one
 * lane, which the same worker drives.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <unistd.h>

#include <libnbd.h>

#include "byteorder.h"
#include "internal.h"

#define REQUEST_MAGIC     0x25609513u
#define SIMPLE_MAGIC      0x67446698u
#define STRUCTURED_MAGIC  0x668e33efu
#define REQUEST_SIZE      28
#define SIMPLE_SIZE       16
#define CHUNK_SIZE        20

enum { NBD_READ = 0, NBD_WRITE = 1, NBD_DISC = 2, NBD_FLUSH = 3, NBD_ZEROES = 6 };
enum { FLAG_NO_HOLE = 1 << 1, FLAG_DF = 1 << 2 };
enum { CHUNK_NONE = 0, CHUNK_DATA = 1, CHUNK_ERROR = 32769, CHUNK_ERROR_OFFSET = 32770 };
#define CHUNK_DONE 1

/* Headers sent in one send(): requests without payload queue up fast. */
#define BATCH       64
/* The largest reply part read into memory (error chunks carry a message). */
#define SMALL_MAX   4096
/* 1 MiB pipes: at the 64 KiB default every request takes several rounds of
 * splices, and the CPU cost per GiB is a third higher (measured). */
#define PIPE_SIZE   (1024 * 1024)

struct zc_pipe {
  int rfd, wfd;
  size_t cap;
  size_t queued;              /* bytes in the pipe */
  bool full;                  /* the kernel took no more: wait for a drain */
  struct raw_rw *producer, *consumer;
};

struct slot {
  struct command *cmd;        /* NULL once a read's payload was handed on */
  uint32_t gen;
  int err;                    /* first error a structured reply gave */
  bool busy;
};

struct raw_rw {
  struct rw rw;               /* must be first */
  struct nbd_handle *h;
  int fd;
  struct nbd_names names;
  bool writable, structured, taken, dead;
  char why[256];              /* what killed the connection */

  struct slot *slots;
  uint32_t nslots, *free_slots, nfree;
  unsigned outstanding;       /* commands queued or sent, not answered */
  unsigned reads_out;         /* of which reads: replies may carry payload */

  /* Sending: commands wait in a queue; obuf holds the headers of a batch,
   * the last of which may have a payload (opay) that follows it. */
  struct command *q_head, *q_tail;
  unsigned char obuf[REQUEST_SIZE * BATCH];
  size_t olen, osent;
  struct command *opay;
  uint64_t pay_done;

  /* Receiving: reply heads are read into ibuf, never past a head while a
   * read is outstanding, so a payload stays in the socket for splice(). */
  unsigned char ibuf[SIMPLE_SIZE * BATCH + CHUNK_SIZE + SMALL_MAX];
  size_t ilen;
  uint64_t rx_left;           /* payload bytes still in the socket */
  int rx_file;                /* where they go: a file, or -1: the pipe */
  uint64_t rx_off;
  uint32_t rx_slot;           /* the read they answer */
  bool rx_done;               /* its chunk had the DONE flag */

  /* A transfer came up short: the socket is drained (or full), so trying
   * again before poll says so would only earn EAGAIN. */
  bool short_in, short_out;
  struct zc_pipe pipe;        /* a source's; rfd -1 on destinations */
  struct raw_rw *feeder;      /* the source whose pipe our writes drain */
};

static const struct rw_ops raw_ops;

static void fail_all(struct raw_rw *r, int errnum, const char *fmt, ...)
  __attribute__((format(printf, 3, 4)));

/* ---- the cookie table --------------------------------------------------- */

static int
slot_take(struct raw_rw *r, struct command *cmd)
{
  if (r->nfree == 0) {
    uint32_t n = r->nslots ? r->nslots * 2 : 64;
    struct slot *s = realloc(r->slots, n * sizeof *s);
    if (s == NULL)
      return -1;
    r->slots = s;
    uint32_t *f = realloc(r->free_slots, n * sizeof *f);
    if (f == NULL)
      return -1;
    r->free_slots = f;
    for (uint32_t i = r->nslots; i < n; i++) {
      r->slots[i] = (struct slot){ 0 };
      r->free_slots[r->nfree++] = n - 1 - (i - r->nslots);
    }
    r->nslots = n;
  }
  uint32_t i = r->free_slots[--r->nfree];
  struct slot *s = &r->slots[i];
  s->cmd = cmd;
  s->gen++;
  s->err = 0;
  s->busy = true;
  cmd->cookie = (uint64_t)s->gen << 32 | i;
  r->outstanding++;
  if (cmd->type == CMD_READ)
    r->reads_out++;
  return 0;
}

static struct slot *
slot_find(struct raw_rw *r, uint64_t cookie)
{
  uint32_t i = (uint32_t)cookie;
  if (i >= r->nslots || !r->slots[i].busy || r->slots[i].gen != cookie >> 32)
    return NULL;
  return &r->slots[i];
}

static void
slot_release(struct raw_rw *r, struct slot *s, bool read)
{
  s->busy = false;
  s->cmd = NULL;
  r->free_slots[r->nfree++] = (uint32_t)(s - r->slots);
  r->outstanding--;
  if (read)
    r->reads_out--;
}

/* ---- failure ------------------------------------------------------------ */

/* The stream is unusable: every command still waiting completes with the
 * error, and so does the other end of a shared pipe, whose stream would
 * otherwise wait forever for bytes that never come. */
static void
fail_all(struct raw_rw *r, int errnum, const char *fmt, ...)
{
  va_list ap;

  if (r->dead)
    return;
  r->dead = true;
  va_start(ap, fmt);
  vsnprintf(r->why, sizeof r->why, fmt, ap);
  va_end(ap);
  for (uint32_t i = 0; i < r->nslots; i++) {
    struct slot *s = &r->slots[i];
    if (!s->busy)
      continue;
    struct command *cmd = s->cmd;
    slot_release(r, s, cmd ? cmd->type == CMD_READ : true);
    if (cmd)
      cmd->done(cmd, errnum);
  }
  r->q_head = r->q_tail = r->opay = NULL;
  r->rx_left = 0;
  if (r->pipe.consumer)
    fail_all(r->pipe.consumer, errnum, "%s", r->why);
  if (r->feeder)
    fail_all(r->feeder, errnum, "%s", r->why);
}

static int
dead_error(struct raw_rw *r, struct vf_error *err)
{
  return vf_set_error(err, VF_ERR_IO, EIO, "%s: %s", r->rw.name,
                      r->why[0] ? r->why : "connection lost");
}

/* ---- sending ------------------------------------------------------------ */

static bool
has_payload(const struct command *cmd)
{
  return cmd->type == CMD_WRITE && cmd->length > 0;
}

/* A write from a pipe may only start once the bytes arrive: its header
 * announces a payload, and a header left waiting would hold up the stream. */
static bool
payload_ready(const struct command *cmd)
{
  return cmd->payload != PAYLOAD_PIPE || cmd->pipe->queued > 0;
}

static void
put_request(struct raw_rw *r, const struct command *cmd)
{
  unsigned char *p = r->obuf + r->olen;
  uint16_t type = NBD_READ, flags = 0;
  uint32_t len = (uint32_t)cmd->length;

  switch (cmd->type) {
  case CMD_READ:  type = NBD_READ; flags = r->structured ? FLAG_DF : 0; break;
  case CMD_WRITE: type = NBD_WRITE; break;
  case CMD_ZERO:  type = NBD_ZEROES; flags = cmd->allocate ? FLAG_NO_HOLE : 0; break;
  case CMD_FLUSH: type = NBD_FLUSH; len = 0; break;
  }
  put32(p, REQUEST_MAGIC);
  put16(p + 4, flags);
  put16(p + 6, type);
  put64(p + 8, cmd->cookie);
  put64(p + 16, cmd->type == CMD_FLUSH ? 0 : cmd->offset);
  put32(p + 24, len);
  r->olen += REQUEST_SIZE;
}

/* Moves ready commands from the queue into the next batch of headers. */
static bool
pack(struct raw_rw *r)
{
  r->olen = r->osent = 0;
  while (r->q_head && r->olen < sizeof r->obuf) {
    struct command *cmd = r->q_head;
    bool pay = has_payload(cmd);
    if (pay && !payload_ready(cmd))
      break;
    put_request(r, cmd);
    r->q_head = cmd->next_queued;
    if (r->q_head == NULL)
      r->q_tail = NULL;
    if (pay) {
      r->opay = cmd;
      r->pay_done = 0;
      break;
    }
  }
  return r->olen > 0;
}

/* One step of the current payload: >0 progress, 0 would block, -1 failed. */
static ssize_t
send_payload(struct raw_rw *r)
{
  struct command *cmd = r->opay;
  uint64_t left = cmd->length - r->pay_done;
  ssize_t n;

  switch (cmd->payload) {
  case PAYLOAD_MEMORY:
    n = send(r->fd, cmd->data + r->pay_done, left, MSG_NOSIGNAL);
    break;
  case PAYLOAD_FILE: {
    off_t off = (off_t)(cmd->offset + r->pay_done);
    n = sendfile(r->fd, cmd->fd, &off, left);
    if (n == 0) {
      fail_all(r, EIO, "the source file ended at %llu, inside a write",
               (unsigned long long)off);
      return -1;
    }
    break;
  }
  case PAYLOAD_PIPE: {
    struct zc_pipe *p = cmd->pipe;
    size_t want = left < p->queued ? left : p->queued;
    if (want == 0)
      return 0;
    /* Only the payload's last piece goes without MORE, so TCP sends full
     * segments rather than one per splice. */
    n = splice(p->rfd, NULL, r->fd, NULL, want,
               SPLICE_F_NONBLOCK | SPLICE_F_MOVE | (want < left ? SPLICE_F_MORE : 0));
    if (n > 0) {
      p->queued -= n;
      p->full = false;
    }
    break;
  }
  default:
    n = -1;
    errno = EINVAL;
  }
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
      return 0;
    fail_all(r, errno, "sending a write to the server: %s", strerror(errno));
    return -1;
  }
  r->pay_done += n;
  if (r->pay_done == cmd->length)
    r->opay = NULL;
  else if (cmd->payload != PAYLOAD_PIPE || (size_t)n < left)
    r->short_out = true;   /* (a pipe write may just have run out of bytes) */
  return n;
}

/* Sends as much as the socket takes.  -1 only when the connection died. */
static int
try_send(struct raw_rw *r)
{
  r->short_out = false;
  while (!r->dead && !r->short_out) {
    if (r->osent == r->olen && r->opay == NULL && !pack(r))
      return 0;
    if (r->osent < r->olen) {
      /* The header of a write goes with MORE: its payload follows at once. */
      ssize_t n = send(r->fd, r->obuf + r->osent, r->olen - r->osent,
                       MSG_NOSIGNAL | (r->opay ? MSG_MORE : 0));
      if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
          return 0;
        if (errno == EINTR)
          continue;
        fail_all(r, errno, "sending to the server: %s", strerror(errno));
        return -1;
      }
      r->osent += n;
      r->short_out = r->osent < r->olen;
      continue;
    }
    ssize_t n = send_payload(r);
    if (n <= 0)
      return (int)n;
  }
  return r->dead ? -1 : 0;
}

static bool
want_send(const struct raw_rw *r)
{
  if (r->osent < r->olen)
    return true;
  if (r->opay)
    return payload_ready(r->opay);
  return r->q_head && (!has_payload(r->q_head) || payload_ready(r->q_head));
}

/* ---- receiving ---------------------------------------------------------- */

/* Bytes of the reply at ibuf's start that are read into memory: the simple
 * reply, or the chunk head (with a data chunk's offset), or a small chunk
 * whole.  0 while its magic and type are not yet known. */
static size_t
head_size(const struct raw_rw *r)
{
  if (r->ilen < SIMPLE_SIZE)
    return SIMPLE_SIZE;
  if (get32(r->ibuf) != STRUCTURED_MAGIC)
    return SIMPLE_SIZE;
  if (r->ilen < CHUNK_SIZE)
    return CHUNK_SIZE;
  uint32_t len = get32(r->ibuf + 16);
  if (get16(r->ibuf + 6) == CHUNK_DATA)
    return CHUNK_SIZE + 8;
  return CHUNK_SIZE + len;
}

static int
nbd_errno(uint32_t e)
{
  return e ? (int)e : 0;   /* the protocol's values are Linux's */
}

static void
start_payload(struct raw_rw *r, struct slot *s, uint64_t length, bool done)
{
  struct command *cmd = s->cmd;

  r->rx_left = length;
  r->rx_slot = (uint32_t)(s - r->slots);
  r->rx_done = done;
  r->rx_file = cmd->fd;
  r->rx_off = cmd->offset;
  if (cmd->fd < 0) {
    /* Handed on at once: the destination's write is queued behind
     * whatever the pipe already holds, in the order the bytes arrive. */
    s->cmd = NULL;
    cmd->pipe = &r->pipe;
    cmd->done(cmd, 0);
  }
}

/* The read (or other command) of slot s is answered in full. */
static void
finish(struct raw_rw *r, struct slot *s, int err)
{
  struct command *cmd = s->cmd;
  bool read = cmd ? cmd->type == CMD_READ : true;
  int e = s->err ? s->err : err;

  slot_release(r, s, read);
  if (cmd)
    cmd->done(cmd, e);
  else if (e)   /* the data went on already: it cannot be taken back */
    fail_all(r, e, "the server failed a read after sending its data: %s",
             strerror(e));
}

/* One whole reply head at ibuf's start (head_size bytes). */
static int
handle_reply(struct raw_rw *r, size_t size)
{
  uint32_t magic = get32(r->ibuf);
  uint64_t cookie = get64(r->ibuf + 8);
  struct slot *s = slot_find(r, cookie);

  if (magic != SIMPLE_MAGIC && magic != STRUCTURED_MAGIC) {
    fail_all(r, EPROTO, "bad reply magic 0x%08x: the stream is out of step", magic);
    return -1;
  }
  if (s == NULL) {
    fail_all(r, EPROTO, "a reply to cookie %llu, which nothing asked for",
             (unsigned long long)cookie);
    return -1;
  }
  if (magic == SIMPLE_MAGIC) {
    int e = nbd_errno(get32(r->ibuf + 4));
    if (!e && s->cmd && s->cmd->type == CMD_READ) {
      start_payload(r, s, s->cmd->length, true);
      return 0;
    }
    if (!e && s->cmd == NULL) {
      fail_all(r, EPROTO, "a second reply to one read");
      return -1;
    }
    finish(r, s, e);
    return 0;
  }

  uint16_t flags = get16(r->ibuf + 4), type = get16(r->ibuf + 6);
  uint32_t len = get32(r->ibuf + 16);
  bool done = flags & CHUNK_DONE;
  if (type == CHUNK_DATA) {
    struct command *cmd = s->cmd;
    uint64_t off = get64(r->ibuf + CHUNK_SIZE);
    /* NBD_CMD_FLAG_DF: one chunk with all of it, or the server broke its word */
    if (cmd == NULL || cmd->type != CMD_READ || len < 8 || off != cmd->offset ||
        len - 8 != cmd->length) {
      fail_all(r, EPROTO, "a read answered in pieces despite NBD_CMD_FLAG_DF");
      return -1;
    }
    start_payload(r, s, len - 8, done);
    return 0;
  }
  if (type == CHUNK_ERROR || type == CHUNK_ERROR_OFFSET) {
    int e = len >= 4 ? nbd_errno(get32(r->ibuf + CHUNK_SIZE)) : EIO;
    if (!s->err)
      s->err = e ? e : EIO;
  } else if (type != CHUNK_NONE) {
    fail_all(r, EPROTO, "an unexpected reply chunk of type %u", type);
    return -1;
  }
  (void)size;
  if (done)
    finish(r, s, 0);
  return 0;
}

/* Moves payload out of the socket: >0 progress, 0 would block, -1 died. */
static ssize_t
pump(struct raw_rw *r)
{
  struct zc_pipe *p = &r->pipe;
  size_t room = p->cap - p->queued;
  size_t want = r->rx_left < room ? r->rx_left : room;

  if (want == 0 || (r->rx_file < 0 && p->full))
    return 0;
  /* Never more than the payload left: a socket splice takes whatever is
   * queued, the next reply's head included. */
  ssize_t n = splice(r->fd, NULL, p->wfd, NULL, want,
                     SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
  if (n == 0) {
    fail_all(r, ECONNRESET, "the server closed the connection in the middle of a read's data");
    return -1;
  }
  if (n < 0) {
    if (errno == EINTR)
      return 1;
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      fail_all(r, errno, "receiving read data: %s", strerror(errno));
      return -1;
    }
    /* Either the socket is empty or the pipe ran out of slots (a slot per
     * socket buffer, not per byte); if it holds anything, wait for it to
     * drain before asking again rather than spin. */
    if (p->queued > 0 && r->rx_file < 0)
      p->full = true;
    return 0;
  }
  r->rx_left -= n;
  p->queued += n;
  if ((size_t)n < want)
    r->short_in = true;
  if (r->rx_file >= 0) {
    while (p->queued > 0) {
      loff_t off = (loff_t)r->rx_off;
      ssize_t w = splice(p->rfd, NULL, r->rx_file, &off, p->queued, SPLICE_F_MOVE);
      if (w <= 0) {
        if (w < 0 && errno == EINTR)
          continue;
        int e = w < 0 ? errno : EIO;
        struct slot *s = &r->slots[r->rx_slot];
        if (!s->err)
          s->err = e;
        if (s->cmd)
          s->cmd->sink_failed = true;
        /* what cannot be written is thrown away to keep the stream */
        char sink[4096];
        while (p->queued > 0) {
          ssize_t d = read(p->rfd, sink, p->queued < sizeof sink ? p->queued : sizeof sink);
          if (d <= 0)
            break;
          p->queued -= d;
        }
        p->queued = 0;
        break;
      }
      p->queued -= w;
      r->rx_off += w;
    }
  } else if (p->consumer && try_send(p->consumer) == -1 && r->dead) {
    return -1;
  }
  if (r->rx_left == 0 && r->rx_done)
    finish(r, &r->slots[r->rx_slot], 0);
  return r->dead ? -1 : n;
}

static int
try_recv(struct raw_rw *r)
{
  r->short_in = false;
  while (!r->dead) {
    if (r->rx_left > 0) {
      if (r->short_in)
        return 0;
      ssize_t n = pump(r);
      if (n <= 0)
        return (int)n;
      continue;
    }
    size_t need = head_size(r);
    if (r->ilen >= need) {
      if (need > sizeof r->ibuf) {
        fail_all(r, EPROTO, "a reply chunk of %zu bytes", need);
        return -1;
      }
      if (handle_reply(r, need) == -1)
        return -1;
      memmove(r->ibuf, r->ibuf + need, r->ilen - need);
      r->ilen -= need;
      continue;
    }
    if ((r->outstanding == 0 && r->ilen == 0) || r->short_in)
      return 0;
    /* With a read outstanding, never read past the head in hand: its
     * payload must stay in the socket.  Without, take what is there.  When
     * only reads are outstanding on a structured connection every reply is
     * a chunk of at least 20 bytes, so asking for a data chunk's 28 at once
     * can overrun only into the next head, never into a payload: one recv
     * per reply instead of two. */
    size_t want = r->reads_out ? need - r->ilen : sizeof r->ibuf - r->ilen;
    if (r->structured && r->reads_out && r->reads_out == r->outstanding &&
        need == SIMPLE_SIZE)
      want = CHUNK_SIZE + 8 - r->ilen;
    if (need > sizeof r->ibuf) {
      fail_all(r, EPROTO, "a reply chunk of %zu bytes", need);
      return -1;
    }
    ssize_t n = recv(r->fd, r->ibuf + r->ilen, want, 0);
    if (n == 0) {
      fail_all(r, ECONNRESET, "the server closed the connection with %u requests unanswered",
               r->outstanding);
      return -1;
    }
    if (n < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK)
        return 0;
      if (errno == EINTR)
        continue;
      fail_all(r, errno, "receiving from the server: %s", strerror(errno));
      return -1;
    }
    r->ilen += n;
    if ((size_t)n < want)
      r->short_in = true;
  }
  return -1;
}

static bool
want_recv(const struct raw_rw *r)
{
  if (r->rx_left > 0)
    return r->rx_file >= 0 || (!r->pipe.full && r->pipe.queued < r->pipe.cap);
  return r->outstanding > 0 || r->ilen > 0;
}

/* ---- the operations ----------------------------------------------------- */

static int
enqueue(struct raw_rw *r, struct command *cmd, struct vf_error *err)
{
  if (r->dead)
    return dead_error(r, err);
  if (slot_take(r, cmd) == -1)
    return vf_set_error(err, VF_ERR_IO, ENOMEM, "out of memory");
  r->taken = true;
  cmd->next_queued = NULL;
  if (r->q_tail)
    r->q_tail->next_queued = cmd;
  else
    r->q_head = cmd;
  r->q_tail = cmd;
  /* Going out at once saves a poll round; a failure completes the command
   * (with the error), so it counts as started. */
  (void)try_send(r);
  return 0;
}

static int
raw_start_read(struct rw *rw, struct command *cmd, struct vf_error *err)
{
  struct raw_rw *r = (struct raw_rw *)rw;
  if (r->pipe.rfd < 0)
    return vf_set_error(err, VF_ERR_IO, EINVAL, "%s was opened as a destination",
                        rw->name);
  return enqueue(r, cmd, err);
}

static int
raw_start_write(struct rw *rw, struct command *cmd, struct vf_error *err)
{
  struct raw_rw *r = (struct raw_rw *)rw;
  if (cmd->payload == PAYLOAD_PIPE) {
    struct zc_pipe *p = cmd->pipe;
    if (r->dead) {
      /* its bytes are on their way into a pipe nobody will drain */
      fail_all(p->producer, EIO, "the destination %s is gone", rw->name);
      return dead_error(r, err);
    }
    p->consumer = r;
    r->feeder = p->producer;
  }
  return enqueue(r, cmd, err);
}

static int
raw_start_zero(struct rw *rw, struct command *cmd, bool allocate,
               struct vf_error *err)
{
  cmd->allocate = allocate;
  return enqueue((struct raw_rw *)rw, cmd, err);
}

static int
raw_poll_fd(struct rw *rw, short *events)
{
  struct raw_rw *r = (struct raw_rw *)rw;

  *events = 0;
  if (r->dead)
    return -1;
  if (want_recv(r))
    *events |= POLLIN;
  if (want_send(r))
    *events |= POLLOUT;
  return *events ? r->fd : -1;
}

static int
raw_notify(struct rw *rw, short revents, struct vf_error *err)
{
  struct raw_rw *r = (struct raw_rw *)rw;

  if (r->dead)
    return 0;     /* already reported, its commands already failed */
  if ((revents & (POLLIN | POLLHUP | POLLERR)) && try_recv(r) == -1)
    return dead_error(r, err);
  if ((revents & (POLLOUT | POLLERR)) && try_send(r) == -1)
    return dead_error(r, err);
  return 0;
}

static void
flush_done(struct command *cmd, int err)
{
  *(int *)cmd->data = err ? err : -1;
}

/* After the copy: nothing else is in flight, so wait here. */
static int
raw_flush(struct rw *rw, struct vf_error *err)
{
  struct raw_rw *r = (struct raw_rw *)rw;
  int result = 0;
  struct command cmd = { .type = CMD_FLUSH, .data = (char *)&result,
                         .done = flush_done, .fd = -1 };

  if (nbd_can_flush(r->h) != 1)
    return 0;
  if (enqueue(r, &cmd, err) == -1)
    return -1;
  while (result == 0 && !r->dead) {
    short ev;
    struct pollfd pfd = { .fd = raw_poll_fd(rw, &ev) };
    pfd.events = ev;
    if (pfd.fd < 0)
      break;
    if (poll(&pfd, 1, 30000) <= 0) {
      if (errno == EINTR)
        continue;
      fail_all(r, ETIMEDOUT, "no answer to a flush");
      break;
    }
    if (raw_notify(rw, pfd.revents, err) == -1)
      return -1;
  }
  if (result == -1)
    return 0;
  if (result > 0)
    return vf_set_error(err, VF_ERR_IO, result, "cannot flush %s: %s", rw->name,
                        strerror(result));
  return dead_error(r, err);
}

/* Only before the first data command: afterwards the socket is ours. */
static int
raw_extents(struct rw *rw, uint64_t offset, uint64_t count,
            struct extent_list *out, struct vf_error *err)
{
  struct raw_rw *r = (struct raw_rw *)rw;
  if (r->taken)
    return vf_set_error(err, VF_ERR_IO, EINVAL, "%s: block status after zero-copy "
                        "data started", rw->name);
  if (!r->structured)
    return extent_append(out, offset, count, EXT_DATA);
  return nbd_handle_extents(r->h, &r->names, offset, count, out, err);
}

static void
raw_close(struct rw *rw)
{
  struct raw_rw *r = (struct raw_rw *)rw;

  if (!r->dead && r->taken && r->osent == r->olen && r->opay == NULL) {
    /* A polite NBD_CMD_DISC lets the server finish cleanly, as
     * nbd_shutdown would; on a stream cut mid-request it would be noise. */
    unsigned char disc[REQUEST_SIZE] = { 0 };
    put32(disc, REQUEST_MAGIC);
    put16(disc + 6, NBD_DISC);
    (void)!send(r->fd, disc, sizeof disc, MSG_NOSIGNAL);
  } else if (!r->taken && !r->dead) {
    nbd_shutdown(r->h, 0);
  }
  nbd_close(r->h);
  if (r->pipe.rfd >= 0) {
    close(r->pipe.rfd);
    close(r->pipe.wfd);
  }
  free(r->slots);
  free(r->free_slots);
  nbd_names_free(&r->names);
  free(r);
}

struct rw *
raw_rw_open(const char *uri, bool writable, const char *bitmap,
            struct vf_error *err)
{
  if (uri_kind(uri) != URI_NBD_PLAIN) {
    vf_set_error(err, VF_ERR_ENDPOINT, ENOTSUP, "%s: zero-copy lanes speak plain NBD "
                 "over Unix or TCP sockets (TLS and vsock go through libnbd)", uri);
    return NULL;
  }
  struct raw_rw *r = calloc(1, sizeof *r);
  if (r == NULL) {
    vf_set_error(err, VF_ERR_IO, ENOMEM, "out of memory");
    return NULL;
  }
  r->pipe.rfd = r->pipe.wfd = -1;
  r->h = nbd_connect_checked(uri, writable, bitmap, true, &r->names, err);
  if (r->h == NULL) {
    free(r);
    return NULL;
  }
  r->rw.ops = &raw_ops;
  r->rw.name = r->names.uri;
  r->writable = writable;
  nbd_describe(r->h, &r->rw);
  r->rw.zero_copy = true;
  r->structured = nbd_get_structured_replies_negotiated(r->h) == 1;
  r->fd = nbd_aio_get_fd(r->h);
  if (nbd_get_tls_negotiated(r->h) == 1) {
    vf_set_error(err, VF_ERR_ENDPOINT, ENOTSUP, "%s: TLS goes through libnbd", uri);
    goto fail;
  }
  if (r->structured && !writable && nbd_can_df(r->h) != 1) {
    vf_set_error(err, VF_ERR_ENDPOINT, ENOTSUP, "%s cannot promise unfragmented "
                 "reads (NBD_FLAG_SEND_DF), which splicing needs", uri);
    goto fail;
  }
  if (r->fd < 0 || fcntl(r->fd, F_SETFL, fcntl(r->fd, F_GETFL) | O_NONBLOCK) == -1) {
    vf_set_error(err, VF_ERR_CONNECT, errno, "%s: no socket to drive", uri);
    goto fail;
  }
  if (!writable) {
    int fds[2];
    if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) == -1) {
      vf_set_error(err, VF_ERR_IO, errno, "pipe: %s", strerror(errno));
      goto fail;
    }
    r->pipe.rfd = fds[0];
    r->pipe.wfd = fds[1];
    (void)fcntl(fds[1], F_SETPIPE_SZ, PIPE_SIZE);
    int cap = fcntl(fds[1], F_GETPIPE_SZ);
    r->pipe.cap = cap > 0 ? (size_t)cap : 65536;
    r->pipe.producer = r;
  }
  return &r->rw;

fail:
  nbd_shutdown(r->h, 0);
  r->taken = true;
  r->dead = true;
  raw_close(&r->rw);
  return NULL;
}

/* raw_warm's one read: waits for the socket, at most WARM_WAIT_MS at a time. */
#define WARM_WAIT_MS 30000
#define WARM_COOKIE  UINT64_MAX       /* never a slot's: slots count from 0 */

static int
warm_wait(struct raw_rw *r, short events)
{
  struct pollfd pfd = { .fd = r->fd, .events = events };
  int n;
  while ((n = poll(&pfd, 1, WARM_WAIT_MS)) == -1 && errno == EINTR)
    ;
  if (n > 0)
    return 0;
  fail_all(r, n == 0 ? ETIMEDOUT : errno, "no answer to the first read");
  return -1;
}

static int
warm_io(struct raw_rw *r, void *buf, size_t len, bool out)
{
  unsigned char *p = buf;
  while (len) {
    ssize_t n = out ? send(r->fd, p, len, MSG_NOSIGNAL) : recv(r->fd, p, len, 0);
    if (n > 0) {
      p += n;
      len -= (size_t)n;
    } else if (n == -1 && (errno == EAGAIN || errno == EINTR)) {
      if (warm_wait(r, out ? POLLOUT : POLLIN) == -1)
        return -1;
    } else {
      fail_all(r, n == 0 ? ECONNRESET : errno, "the server closed the connection");
      return -1;
    }
  }
  return 0;
}

/* Throws away LEN bytes of the socket without copying them: spliced into a
 * pipe, and from there into /dev/null. */
static int
warm_discard(struct raw_rw *r, int p[2], int devnull, uint64_t len)
{
  while (len) {
    ssize_t n = splice(r->fd, NULL, p[1], NULL, len < PIPE_SIZE ? len : PIPE_SIZE,
                       SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    if (n == -1 && (errno == EAGAIN || errno == EINTR)) {
      if (warm_wait(r, POLLIN) == -1)
        return -1;
      continue;
    }
    if (n <= 0) {
      fail_all(r, n == 0 ? ECONNRESET : errno, "the server closed the connection");
      return -1;
    }
    len -= (uint64_t)n;
    while (n > 0) {
      ssize_t m = splice(p[0], NULL, devnull, NULL, (size_t)n, SPLICE_F_MOVE);
      if (m <= 0) {
        fail_all(r, m == 0 ? EPIPE : errno, "cannot drain a pipe");
        return -1;
      }
      n -= m;
    }
  }
  return 0;
}

/* nbd_warm_server's read (nbd_ops.c says why), spoken on the socket so its
 * payload never enters this process: through libnbd it cost the client a
 * quarter of its CPU in a 2 GiB copy.  Only before the first data command,
 * as raw_extents; the whole reply is consumed, so libnbd's handle is left
 * as it was and block status still works afterwards. */
static void
raw_warm(struct rw *rw)
{
  struct raw_rw *r = (struct raw_rw *)rw;
  uint64_t len = nbd_warm_length(r->h, rw, !r->writable);
  int p[2] = { -1, -1 }, devnull = -1;
  unsigned char head[CHUNK_SIZE + 8];

  if (r->taken || r->dead || len == 0)
    return;
  if (pipe2(p, O_NONBLOCK | O_CLOEXEC) == -1)
    return;
  (void)fcntl(p[1], F_SETPIPE_SZ, PIPE_SIZE);
  devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
  if (devnull == -1)
    goto out;

  uint64_t at = nbd_warm_offset(r->h, &r->names, rw, len, !r->writable);
  bool df = r->structured && nbd_can_df(r->h) == 1;
  put32(head, REQUEST_MAGIC);
  put16(head + 4, df ? FLAG_DF : 0);
  put16(head + 6, NBD_READ);
  put64(head + 8, WARM_COOKIE);
  put64(head + 16, at);
  put32(head + 24, (uint32_t)len);
  if (warm_io(r, head, REQUEST_SIZE, true) == -1)
    goto out;
  if (!r->structured) {
    if (warm_io(r, head, SIMPLE_SIZE, false) == -1)
      goto out;
    if (get32(head) != SIMPLE_MAGIC || get64(head + 8) != WARM_COOKIE) {
      fail_all(r, EPROTO, "a bad reply to the first read");
      goto out;
    }
    if (get32(head + 4) == 0)
      (void)warm_discard(r, p, devnull, len);
    goto out;
  }
  /* Chunks until one says it is the last; none of their contents matter. */
  for (;;) {
    if (warm_io(r, head, CHUNK_SIZE, false) == -1)
      goto out;
    if (get32(head) != STRUCTURED_MAGIC || get64(head + 8) != WARM_COOKIE) {
      fail_all(r, EPROTO, "a bad reply to the first read");
      goto out;
    }
    if (warm_discard(r, p, devnull, get32(head + 16)) == -1 ||
        (get16(head + 4) & CHUNK_DONE))
      goto out;
  }
out:
  close(p[0]);
  close(p[1]);
  if (devnull != -1)
    close(devnull);
}

static struct rw *
raw_open_again(struct rw *rw, struct vf_error *err)
{
  struct raw_rw *r = (struct raw_rw *)rw;
  return raw_rw_open(r->names.uri, r->writable, NULL, err);
}

static const struct rw_ops raw_ops = {
  .kind = "nbd-zero-copy",
  .served = true,
  .plan_up_front = true,
  .open_again = raw_open_again,
  .close = raw_close,
  .extents = raw_extents,
  .start_read = raw_start_read,
  .start_write = raw_start_write,
  .start_zero = raw_start_zero,
  .poll_fd = raw_poll_fd,
  .notify = raw_notify,
  .flush = raw_flush,
  .warm = raw_warm,
  .pread = NULL,
  .pwrite = NULL,
  .zero = NULL,
};
