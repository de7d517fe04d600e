/* The copy loop.
 *
 * The source is cut into work ranges handed out under one small mutex; that
 * is the only lock on the data path.  Each worker thread owns one or more
 * "lanes" (a source connection and a destination connection) and drives all
 * of them from one poll loop, so a 2-core machine is not asked to schedule
 * a thread per connection.  For each range the worker asks the source for
 * extents, then keeps up to `requests` commands in flight per lane: data is
 * read into a buffer and written from that same buffer (split into data and
 * zero requests where zero detection finds zero blocks, never copied), zero
 * extents become zero requests, clean or known-zero extents are skipped.
 *
 * Zero-copy lanes (nbd_raw.c, and files) hold no buffers: the destination
 * takes a file source's bytes itself, and an NBD source's read hands its
 * payload to the destination through a pipe as it arrives.  An NBD source's
 * socket cannot answer block status once it carries such payloads, so those
 * copies fetch the whole plan before the first byte moves.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define MAX_RANGE       (128ULL * 1024 * 1024)
#define MIN_RANGE       (1ULL * 1024 * 1024)
#define ZERO_MAX        (256ULL * 1024 * 1024)
#define ZERO_BLOCK      (64 * 1024)     /* granularity of zero detection */
#define DRAIN_TIMEOUT_MS 10000
/* How far ahead of the rate a copy may issue: enough to keep a few requests
 * in flight on every lane, small enough that a limit holds over a second. */
#define RATE_AHEAD_NS   (100LL * 1000 * 1000)

enum { RUNNING = 0, STOP_ERROR = 1, STOP_CANCEL = 2 };

struct buffer {
  char *data;
  unsigned refs;
  struct buffer *next_free;
};

struct lane {
  struct worker *w;
  struct rw *src, *dst;
  bool zc;                    /* a zero-copy lane: no buffers */
  unsigned in_flight, max_in_flight;
  struct buffer *free_bufs;
  unsigned nbufs, max_bufs;
  struct command *free_cmds;
  /* Written only by the owning worker; read by anyone with atomics. */
  uint64_t read, written, zeroed, skipped;
};

struct worker {
  struct vf_copy *c;
  uint64_t range_i;           /* the work range being planned, if range_open */
  bool range_open;
  pthread_t tid;
  struct rw *map;             /* this worker's extents_from connection, or NULL */
  struct lane **lanes;
  unsigned nlanes;
  struct extent_list ext;
  size_t ext_i;
  uint64_t ext_done;          /* bytes of ext.v[ext_i] already issued */
  bool out_of_work;
  struct pollfd *pfds;
  struct rw **pfd_rw;
  long long rate_wake_ns;     /* the rate limit holds issuing until then; 0: no */
};

struct vf_copy {
  struct vf_copy_config cfg;
  char *src, *dst, *bitmap, *extents_from;
  uint64_t size;
  uint32_t request_size;
  unsigned nlanes, nworkers;
  struct lane *lanes;
  struct worker *workers;
  pthread_mutex_t lock;       /* guards next_offset and err */
  uint64_t start, end;        /* the part of the source to copy */
  uint64_t next_offset, range_size;
  /* Per work range: the requests in flight in it, plus one while a worker
   * still plans it.  Zero once handed out means every byte of it is done;
   * a failed or dropped request never gives its count back, so the range
   * stays unfinished.  Atomics: completions run on several workers. */
  uint64_t nranges;
  unsigned *pending;
  int stop;                   /* RUNNING / STOP_*; atomic */
  int wakefd;
  /* The rate limit (GCRA): the instant, in ns, at which every byte granted
   * so far is paid for at cfg.rate.  Workers share it through one CAS per
   * request rather than a lock. */
  uint64_t rate_paid_ns;
  bool ran;
  bool zc;                    /* zero-copy lanes */
  char zc_note[600];          /* why not, when they were asked for */
  bool planned;               /* plan holds every extent of the source */
  struct extent_list plan;
  bool created_dst;           /* this copy made the destination file */
  struct vf_error err;
};

static inline void
add(uint64_t *counter, uint64_t n)
{
  __atomic_fetch_add(counter, n, __ATOMIC_RELAXED);
}

static inline int
stopping(struct vf_copy *c)
{
  return __atomic_load_n(&c->stop, __ATOMIC_ACQUIRE);
}

/* Records the first error and stops every worker. */
static void
fail(struct vf_copy *c, int kind, int errnum, const char *fmt, ...)
{
  va_list ap;

  pthread_mutex_lock(&c->lock);
  if (c->err.kind == VF_ERR_NONE) {
    c->err.kind = kind;
    c->err.errnum = errnum;
    va_start(ap, fmt);
    vsnprintf(c->err.msg, sizeof c->err.msg, fmt, ap);
    va_end(ap);
  }
  pthread_mutex_unlock(&c->lock);
  int expected = RUNNING;
  __atomic_compare_exchange_n(&c->stop, &expected, STOP_ERROR, false,
                              __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

static void
fail_with(struct vf_copy *c, const struct vf_error *e)
{
  fail(c, e->kind ? e->kind : VF_ERR_IO, e->errnum, "%s", e->msg);
}

/* ---- the completed prefix --------------------------------------------- */

static inline uint64_t
range_of(const struct vf_copy *c, uint64_t offset)
{
  return (offset - c->start) / c->range_size;
}

static inline void
range_hold(struct vf_copy *c, uint64_t offset)
{
  __atomic_fetch_add(&c->pending[range_of(c, offset)], 1, __ATOMIC_RELAXED);
}

/* A request succeeded, and whatever it leads to is issued and holds the
 * range itself. */
static inline void
range_release(struct vf_copy *c, uint64_t offset)
{
  __atomic_fetch_sub(&c->pending[range_of(c, offset)], 1, __ATOMIC_RELEASE);
}

/* The end of the longest run of finished work ranges from the start: ranges
 * finish out of order (several lanes, out-of-order replies), so what lies
 * beyond it may be done too, but is not known to be. */
static uint64_t
done_below(struct vf_copy *c)
{
  uint64_t handed;

  pthread_mutex_lock(&c->lock);
  handed = c->next_offset;
  pthread_mutex_unlock(&c->lock);
  for (uint64_t i = 0; i < c->nranges; i++) {
    uint64_t at = c->start + i * c->range_size;
    if (at >= handed || __atomic_load_n(&c->pending[i], __ATOMIC_ACQUIRE) != 0)
      return at;
  }
  return c->end;
}

/* ---- buffers and commands ------------------------------------------- */

static struct buffer *
buffer_get(struct lane *l)
{
  struct buffer *b = l->free_bufs;

  if (b) {
    l->free_bufs = b->next_free;
  } else {
    b = calloc(1, sizeof *b);
    if (b == NULL)
      return NULL;
    if (posix_memalign((void **)&b->data, 4096, l->w->c->request_size) != 0) {
      free(b);
      return NULL;
    }
    l->nbufs++;
  }
  b->refs = 1;
  return b;
}

static void
buffer_put(struct lane *l, struct buffer *b)
{
  if (b && --b->refs == 0) {
    b->next_free = l->free_bufs;
    l->free_bufs = b;
  }
}

static bool
lane_has_buffer(struct lane *l)
{
  return l->free_bufs != NULL || l->nbufs < l->max_bufs;
}

static struct command *
command_get(struct lane *l, enum command_type type, uint64_t offset,
            uint64_t length, struct buffer *buf, char *data,
            void (*done)(struct command *, int))
{
  struct command *cmd = l->free_cmds;

  if (cmd)
    l->free_cmds = cmd->next_free;
  else if ((cmd = malloc(sizeof *cmd)) == NULL)
    return NULL;
  *cmd = (struct command){
    .type = type, .offset = offset, .length = length, .data = data,
    .buf = buf, .lane = l, .done = done, .fd = -1,
  };
  if (buf)
    buf->refs++;
  l->in_flight++;
  range_hold(l->w->c, offset);
  return cmd;
}

static void
command_put(struct command *cmd)
{
  struct lane *l = cmd->lane;

  buffer_put(l, cmd->buf);
  l->in_flight--;
  cmd->next_free = l->free_cmds;
  l->free_cmds = cmd;
}

/* ---- issuing writes --------------------------------------------------- */

static void write_done(struct command *cmd, int err);
static void zero_done(struct command *cmd, int err);

static void
issue_write(struct lane *l, struct buffer *buf, char *data, uint64_t offset,
            uint64_t length)
{
  struct vf_copy *c = l->w->c;
  struct vf_error e = { 0 };
  struct command *cmd = command_get(l, CMD_WRITE, offset, length, buf, data,
                                    write_done);
  if (cmd == NULL) {
    fail(c, VF_ERR_IO, ENOMEM, "out of memory");
    return;
  }
  if (l->dst->ops->start_write(l->dst, cmd, &e) == -1) {
    command_put(cmd);
    fail_with(c, &e);
  }
}

/* Zero a range, or write zeroes from the shared zero buffer when the
 * destination cannot zero. */
static void
issue_zero(struct lane *l, uint64_t offset, uint64_t length)
{
  struct vf_copy *c = l->w->c;
  struct vf_error e = { 0 };

  if (!l->dst->can_zero) {
    while (length > 0 && !stopping(c)) {
      uint64_t n = length < ZERO_BUFFER_SIZE ? length : ZERO_BUFFER_SIZE;
      struct command *cmd = command_get(l, CMD_WRITE, offset, n, NULL,
                                        (char *)vf_zero_buffer, zero_done);
      if (cmd == NULL) {
        fail(c, VF_ERR_IO, ENOMEM, "out of memory");
        return;
      }
      if (l->dst->ops->start_write(l->dst, cmd, &e) == -1) {
        command_put(cmd);
        fail_with(c, &e);
        return;
      }
      offset += n;
      length -= n;
    }
    return;
  }
  struct command *cmd = command_get(l, CMD_ZERO, offset, length, NULL, NULL,
                                    zero_done);
  if (cmd == NULL) {
    fail(c, VF_ERR_IO, ENOMEM, "out of memory");
    return;
  }
  if (l->dst->ops->start_zero(l->dst, cmd, c->cfg.allocated != 0, &e) == -1) {
    command_put(cmd);
    fail_with(c, &e);
  }
}

/* ---- completions ------------------------------------------------------ */

static void
report_io_error(struct command *cmd, int err, const char *what, const char *name)
{
  fail(cmd->lane->w->c, VF_ERR_IO, err,
       "%s %s failed at offset %llu (%llu bytes): %s", what, name,
       (unsigned long long)cmd->offset, (unsigned long long)cmd->length,
       strerror(err));
}

static void
write_done(struct command *cmd, int err)
{
  struct lane *l = cmd->lane;

  if (err)
    report_io_error(cmd, err, "writing to", l->dst->name);
  else {
    add(&l->written, cmd->length);
    range_release(l->w->c, cmd->offset);
  }
  command_put(cmd);
}

static void
zero_done(struct command *cmd, int err)
{
  struct lane *l = cmd->lane;

  if (err)
    report_io_error(cmd, err, "zeroing", l->dst->name);
  else {
    add(&l->zeroed, cmd->length);
    range_release(l->w->c, cmd->offset);
  }
  command_put(cmd);
}

/* The read finished: split the buffer into runs of data and runs of zero
 * blocks and send each run on from the same memory. */
static void
read_done(struct command *cmd, int err)
{
  struct lane *l = cmd->lane;
  struct vf_copy *c = l->w->c;
  uint64_t pos = 0;

  if (err) {
    report_io_error(cmd, err, "reading from", l->src->name);
    command_put(cmd);
    return;
  }
  add(&l->read, cmd->length);
  if (stopping(c)) {
    command_put(cmd);
    return;
  }
  if (c->cfg.no_zero_detect) {
    issue_write(l, cmd->buf, cmd->data, cmd->offset, cmd->length);
    range_release(c, cmd->offset);
    command_put(cmd);
    return;
  }
  while (pos < cmd->length) {
    /* Blocks are aligned to the disk offset so that runs line up with
     * the destination's allocation units. */
    uint64_t start = pos;
    bool zero = false;
    bool first = true;
    while (pos < cmd->length) {
      uint64_t off = cmd->offset + pos;
      uint64_t n = ZERO_BLOCK - off % ZERO_BLOCK;
      if (n > cmd->length - pos)
        n = cmd->length - pos;
      bool z = is_zero(cmd->data + pos, n);
      if (first) {
        zero = z;
        first = false;
      } else if (z != zero)
        break;
      pos += n;
    }
    uint64_t len = pos - start;
    if (!zero)
      issue_write(l, cmd->buf, cmd->data + start, cmd->offset + start, len);
    else if (c->cfg.destination_is_zero)
      add(&l->skipped, len);
    else
      issue_zero(l, cmd->offset + start, len);
  }
  range_release(c, cmd->offset);
  command_put(cmd);
}

/* ---- zero-copy -------------------------------------------------------- */

static void
zc_write_done(struct command *cmd, int err)
{
  struct lane *l = cmd->lane;

  if (err)
    report_io_error(cmd, err, "writing to", l->dst->name);
  else {
    if (cmd->payload == PAYLOAD_FILE)   /* the destination read it itself */
      add(&l->read, cmd->length);
    add(&l->written, cmd->length);
    range_release(l->w->c, cmd->offset);
  }
  command_put(cmd);
}

/* The read's payload is in the destination file, or (fd -1) arriving in
 * cmd->pipe, which the write queued here drains; it must be queued even
 * when the copy is stopping, or the source's stream would stall. */
static void
zc_read_done(struct command *cmd, int err)
{
  struct lane *l = cmd->lane;
  struct vf_error e = { 0 };

  if (err) {
    if (cmd->sink_failed)
      report_io_error(cmd, err, "writing to", l->dst->name);
    else
      report_io_error(cmd, err, "reading from", l->src->name);
    command_put(cmd);
    return;
  }
  add(&l->read, cmd->length);
  if (cmd->fd >= 0) {
    add(&l->written, cmd->length);
    range_release(l->w->c, cmd->offset);
    command_put(cmd);
    return;
  }
  struct command *w = command_get(l, CMD_WRITE, cmd->offset, cmd->length, NULL,
                                  NULL, zc_write_done);
  if (w == NULL) {
    fail(l->w->c, VF_ERR_IO, ENOMEM, "out of memory");
  } else {
    w->payload = PAYLOAD_PIPE;
    w->pipe = cmd->pipe;
    if (l->dst->ops->start_write(l->dst, w, &e) == -1) {
      command_put(w);
      fail_with(l->w->c, &e);
    } else {
      range_release(l->w->c, cmd->offset);   /* the write holds it now */
    }
  }
  command_put(cmd);
}

static int
issue_zero_copy(struct lane *l, uint64_t off, uint64_t len)
{
  struct vf_copy *c = l->w->c;
  struct vf_error e = { 0 };
  bool from_file = l->src->splice_fd >= 0;
  struct command *cmd = command_get(l, from_file ? CMD_WRITE : CMD_READ, off, len,
                                    NULL, NULL,
                                    from_file ? zc_write_done : zc_read_done);
  if (cmd == NULL) {
    fail(c, VF_ERR_IO, ENOMEM, "out of memory");
    return -1;
  }
  int r;
  if (from_file) {
    cmd->payload = PAYLOAD_FILE;
    cmd->fd = l->src->splice_fd;
    r = l->dst->ops->start_write(l->dst, cmd, &e);
  } else {
    cmd->fd = l->dst->splice_fd;
    r = l->src->ops->start_read(l->src, cmd, &e);
  }
  if (r == -1) {
    command_put(cmd);
    fail_with(c, &e);
  }
  return r;
}

/* ---- rate limit ------------------------------------------------------- */

static long long
now_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Grants n bytes and returns 0, or returns how many ns to wait first.  A
 * request may go while the bytes granted before it are paid for no further
 * than RATE_AHEAD_NS from now, so idle time builds no burst beyond that. */
static long long
rate_take(struct vf_copy *c, uint64_t n)
{
  if (c->cfg.rate == 0)
    return 0;
  uint64_t cost = (uint64_t)((unsigned __int128)n * 1000000000u / c->cfg.rate);
  uint64_t paid = __atomic_load_n(&c->rate_paid_ns, __ATOMIC_RELAXED);
  for (;;) {
    uint64_t now = (uint64_t)now_ns();
    uint64_t from = paid > now ? paid : now;
    if (from - now > (uint64_t)RATE_AHEAD_NS)
      return (long long)(from - now - RATE_AHEAD_NS);
    if (__atomic_compare_exchange_n(&c->rate_paid_ns, &paid, from + cost, false,
                                    __ATOMIC_RELAXED, __ATOMIC_RELAXED))
      return 0;
  }
}

/* ---- planning --------------------------------------------------------- */

/* [start, end) of the plan fetched before the copy into w->ext. */
static bool
slice_plan(struct worker *w, uint64_t start, uint64_t end)
{
  const struct extent_list *p = &w->c->plan;
  size_t lo = 0, hi = p->len;

  while (lo < hi) {           /* the first extent ending after start */
    size_t mid = lo + (hi - lo) / 2;
    if (p->v[mid].offset + p->v[mid].length <= start)
      lo = mid + 1;
    else
      hi = mid;
  }
  for (size_t i = lo; i < p->len && p->v[i].offset < end; i++) {
    uint64_t a = p->v[i].offset > start ? p->v[i].offset : start;
    uint64_t b = p->v[i].offset + p->v[i].length;
    if (b > end)
      b = end;
    if (extent_append(&w->ext, a, b - a, p->v[i].type) == -1) {
      fail(w->c, VF_ERR_IO, ENOMEM, "out of memory");
      return false;
    }
  }
  if (w->ext.len == 0)   /* never lose a byte to a short plan */
    return extent_append(&w->ext, start, end - start, EXT_DATA) == 0;
  return true;
}

/* The whole source's extents, before its socket carries zero-copy data. */
static int
fetch_plan(struct vf_copy *c, struct rw *src, struct vf_error *err)
{
  uint64_t pos = c->start;

  while (pos < c->end) {
    size_t before = c->plan.len;
    if (src->ops->extents(src, pos, c->end - pos, &c->plan, err) == -1)
      return -1;
    if (c->plan.len == before &&
        extent_append(&c->plan, pos, c->end - pos, EXT_DATA) == -1)
      return vf_set_error(err, VF_ERR_IO, ENOMEM, "out of memory");
    struct extent *last = &c->plan.v[c->plan.len - 1];
    pos = last->offset + last->length;
  }
  c->planned = true;
  return 0;
}

/* Fetch the extents of the next work range into w->ext.  False when the
 * whole source has been handed out. */
static bool
next_range(struct worker *w)
{
  struct vf_copy *c = w->c;
  struct rw *src = w->map ? w->map : w->lanes[0]->src;
  struct vf_error e = { 0 };
  uint64_t start, end, pos;

  pthread_mutex_lock(&c->lock);
  start = c->next_offset;
  if (start < c->end) {
    c->next_offset = start + c->range_size;
    range_hold(c, start);       /* released once it is all planned */
  }
  pthread_mutex_unlock(&c->lock);
  if (start >= c->end)
    return false;
  w->range_i = range_of(c, start);
  w->range_open = true;
  end = start + c->range_size < c->end ? start + c->range_size : c->end;

  w->ext.len = 0;
  w->ext_i = 0;
  w->ext_done = 0;
  if (c->planned)
    return slice_plan(w, start, end);
  for (pos = start; pos < end && !stopping(c);) {
    size_t before = w->ext.len;
    if (src->ops->extents(src, pos, end - pos, &w->ext, &e) == -1) {
      fail_with(c, &e);
      return false;
    }
    if (w->ext.len == before) {  /* defensive: never loop forever */
      if (extent_append(&w->ext, pos, end - pos, EXT_DATA) == -1) {
        fail(c, VF_ERR_IO, ENOMEM, "out of memory");
        return false;
      }
    }
    struct extent *last = &w->ext.v[w->ext.len - 1];
    pos = last->offset + last->length;
  }
  return true;
}

static struct lane *
pick_lane(struct worker *w, bool need_buffer)
{
  struct lane *best = NULL;
  for (unsigned i = 0; i < w->nlanes; i++) {
    struct lane *l = w->lanes[i];
    if (l->in_flight >= l->max_in_flight)
      continue;
    if (need_buffer && !l->zc && !lane_has_buffer(l))
      continue;
    if (best == NULL || l->in_flight < best->in_flight)
      best = l;
  }
  return best;
}

/* Issue as many commands as the lanes have room for. */
static void
fill(struct worker *w)
{
  struct vf_copy *c = w->c;

  w->rate_wake_ns = 0;
  while (!stopping(c) && !w->out_of_work) {
    if (w->ext_i >= w->ext.len) {
      if (w->range_open) {
        range_release(c, c->start + w->range_i * c->range_size);
        w->range_open = false;
      }
      if (!next_range(w)) {
        w->out_of_work = true;
        return;
      }
      continue;
    }
    struct extent *e = &w->ext.v[w->ext_i];
    uint64_t off = e->offset + w->ext_done;
    uint64_t left = e->length - w->ext_done;
    uint64_t len;

    if (e->type == EXT_SKIP ||
        (e->type == EXT_ZERO && c->cfg.destination_is_zero)) {
      add(&w->lanes[0]->skipped, left);
      len = left;
    } else {
      struct lane *l = pick_lane(w, e->type == EXT_DATA);
      if (l == NULL)
        return;
      bool zero = e->type == EXT_ZERO;
      if (zero) {
        len = left < ZERO_MAX ? left : ZERO_MAX;
        /* zeroes written as data are paced in pieces, not one lump */
        if (!l->dst->can_zero && c->cfg.rate && len > ZERO_BUFFER_SIZE)
          len = ZERO_BUFFER_SIZE;
      } else {
        /* End requests on request-size boundaries so every later request
         * is aligned whatever the extent boundaries were. */
        len = c->request_size - off % c->request_size;
        if (len > left)
          len = left;
      }
      if (!zero || !l->dst->can_zero) {
        long long wait = rate_take(c, len);
        if (wait > 0) {
          w->rate_wake_ns = now_ns() + wait;
          return;
        }
      }
      if (zero) {
        issue_zero(l, off, len);
      } else if (l->zc) {
        if (issue_zero_copy(l, off, len) == -1)
          return;
      } else {
        struct buffer *b = buffer_get(l);
        if (b == NULL) {
          fail(c, VF_ERR_IO, ENOMEM, "out of memory for copy buffers");
          return;
        }
        struct vf_error err = { 0 };
        struct command *cmd = command_get(l, CMD_READ, off, len, b, b->data,
                                          read_done);
        buffer_put(l, b);     /* the command holds the buffer now */
        if (cmd == NULL) {
          fail(c, VF_ERR_IO, ENOMEM, "out of memory");
          return;
        }
        if (l->src->ops->start_read(l->src, cmd, &err) == -1) {
          command_put(cmd);
          fail_with(c, &err);
          return;
        }
      }
    }
    w->ext_done += len;
    if (w->ext_done >= e->length) {
      w->ext_i++;
      w->ext_done = 0;
    }
  }
}

static unsigned
in_flight(struct worker *w)
{
  unsigned n = 0;
  for (unsigned i = 0; i < w->nlanes; i++)
    n += w->lanes[i]->in_flight;
  return n;
}

static long long
now_ms(void)
{
  return now_ns() / 1000000;
}

/* Wait for any connection to be ready and let libnbd handle it (which runs
 * the completion callbacks above).  False when nothing can progress. */
static bool
wait_events(struct worker *w, long long drain_deadline)
{
  struct vf_copy *c = w->c;
  nfds_t n = 0;
  int timeout = -1;

  if (drain_deadline == 0) {
    w->pfds[n] = (struct pollfd){ .fd = c->wakefd, .events = POLLIN };
    w->pfd_rw[n++] = NULL;
    if (w->rate_wake_ns) {
      long long ns = w->rate_wake_ns - now_ns();
      timeout = ns > 0 ? (int)((ns + 999999) / 1000000) : 0;
    }
  } else {
    timeout = (int)(drain_deadline - now_ms());
    if (timeout <= 0)
      return false;
  }
  nfds_t first_rw = n;
  for (unsigned i = 0; i < w->nlanes; i++) {
    struct rw *ends[2] = { w->lanes[i]->src, w->lanes[i]->dst };
    for (int k = 0; k < 2; k++) {
      short ev;
      int fd = ends[k]->ops->poll_fd(ends[k], &ev);
      if (fd >= 0) {
        w->pfds[n] = (struct pollfd){ .fd = fd, .events = ev };
        w->pfd_rw[n++] = ends[k];
      }
    }
  }
  /* commands in flight, but no connection alive (only the rate limit may
   * have a worker wait with nothing in flight) */
  if (n == first_rw && (drain_deadline || !w->rate_wake_ns))
    return false;
  if (poll(w->pfds, n, timeout) == -1) {
    if (errno == EINTR)
      return true;
    fail(c, VF_ERR_IO, errno, "poll: %s", strerror(errno));
    return false;
  }
  for (nfds_t i = first_rw; i < n; i++) {
    if (w->pfds[i].revents) {
      struct vf_error e = { 0 };
      if (w->pfd_rw[i]->ops->notify(w->pfd_rw[i], w->pfds[i].revents, &e) == -1)
        fail_with(c, &e);
    }
  }
  return true;
}

static void *
worker_run(void *opaque)
{
  struct worker *w = opaque;
  struct vf_copy *c = w->c;
  long long deadline = 0;

  for (;;) {
    if (!stopping(c))
      fill(w);
    if (in_flight(w) == 0 && (stopping(c) || w->out_of_work))
      break;
    if (stopping(c) && deadline == 0)
      deadline = now_ms() + DRAIN_TIMEOUT_MS;
    if (!wait_events(w, deadline)) {
      /* A server that went away or stopped answering: its commands will
       * never complete.  Leave them; close() will drop the connections. */
      if (!stopping(c))
        fail(c, VF_ERR_IO, EIO, "lost every connection with requests in flight");
      break;
    }
  }
  return NULL;
}

/* ---- setup ------------------------------------------------------------ */

static int
check_config(const struct vf_copy_config *cfg, struct vf_error *err)
{
  if (cfg->connections > 64)
    return vf_set_error(err, VF_ERR_USAGE, EINVAL,
                        "--connections must be 1 to 64, not %u", cfg->connections);
  if (cfg->requests > 1024)
    return vf_set_error(err, VF_ERR_USAGE, EINVAL,
                        "--requests must be 1 to 1024, not %u", cfg->requests);
  if (cfg->request_size &&
      (cfg->request_size < 512 || cfg->request_size > 32 * 1024 * 1024 ||
       (cfg->request_size & (cfg->request_size - 1))))
    return vf_set_error(err, VF_ERR_USAGE, EINVAL,
                        "--request-size must be a power of two from 512 bytes "
                        "to 32 MiB, not %u", cfg->request_size);
  if (cfg->allocated && cfg->destination_is_zero)
    return vf_set_error(err, VF_ERR_USAGE, EINVAL,
                        "--allocated and --destination-is-zero contradict each "
                        "other: choose one");
  return 0;
}

static bool
zc_endpoint(const char *uri)
{
  enum uri_kind k = uri_kind(uri);
  return k == URI_FILE || k == URI_NBD_PLAIN;
}

/* What rules zero-copy lanes out before anything connects, or NULL.  Deciding
 * before connecting matters: a server that serves one client and exits
 * after it (qemu-nbd without -t) must not be connected to twice. */
static const char *
zc_ruled_out(struct vf_copy *c, bool have_map)
{
  static const char why_null[] = "null: takes its data through libnbd lanes";
  if (*c->src == '\0' || *c->dst == '\0')
    return "an endpoint is missing";
  if (strcmp(c->dst, "null:") == 0)
    return why_null;
  if (!zc_endpoint(c->src) || !zc_endpoint(c->dst)) {
    snprintf(c->zc_note, sizeof c->zc_note,
             "%s: zero-copy lanes speak plain NBD over Unix or TCP sockets or "
             "files (TLS and vsock go through libnbd)",
             zc_endpoint(c->src) ? c->dst : c->src);
    return c->zc_note;
  }
  if (c->bitmap && !have_map && uri_kind(c->src) == URI_FILE)
    return "--bitmap needs an NBD source";    /* rw_open says so */
  return NULL;
}

static struct rw *
zc_open(const char *uri, bool writable, const char *bitmap, struct vf_error *err)
{
  return uri_kind(uri) == URI_FILE ? file_rw_open(uri, writable, err)
                                   : raw_rw_open(uri, writable, bitmap, err);
}

/* A zero-copy end that could not be: in auto mode the note says why and the
 * caller falls back; with zero_copy on, or for any other failure, it is the
 * copy's error. */
static bool
zc_fallback(struct vf_copy *c, struct vf_error *err)
{
  if (c->cfg.zero_copy != VF_ZERO_COPY_AUTO || err->errnum != ENOTSUP)
    return false;
  snprintf(c->zc_note, sizeof c->zc_note, "%s", err->msg);
  memset(err, 0, sizeof *err);
  return true;
}

static long
online_cpus(void)
{
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? n : 1;
}

struct vf_copy *
vf_copy_open(const struct vf_copy_config *cfg, struct vf_error *err)
{
  struct vf_copy *c;
  struct rw *src0 = NULL, *dst0 = NULL, *map0 = NULL;
  unsigned i;

  if (check_config(cfg, err) == -1)
    return NULL;
  c = calloc(1, sizeof *c);
  if (c == NULL) {
    vf_set_error(err, VF_ERR_IO, ENOMEM, "out of memory");
    return NULL;
  }
  c->cfg = *cfg;
  c->src = strdup(cfg->src ? cfg->src : "");
  c->dst = strdup(cfg->dst ? cfg->dst : "");
  c->bitmap = cfg->bitmap ? strdup(cfg->bitmap) : NULL;
  c->extents_from = cfg->extents_from ? strdup(cfg->extents_from) : NULL;
  c->cfg.src = c->src;
  c->cfg.dst = c->dst;
  c->cfg.bitmap = c->bitmap;
  c->cfg.extents_from = c->extents_from;
  c->wakefd = -1;
  pthread_mutex_init(&c->lock, NULL);
  if (c->src == NULL || c->dst == NULL || (cfg->bitmap && c->bitmap == NULL) ||
      (cfg->extents_from && c->extents_from == NULL)) {
    vf_set_error(err, VF_ERR_IO, ENOMEM, "out of memory");
    goto fail;
  }

  if (c->extents_from) {
    if (c->bitmap && uri_kind(c->extents_from) == URI_FILE) {
      vf_set_error(err, VF_ERR_USAGE, EINVAL,
                   "--extents-from %s: dirty extents come from an NBD export that "
                   "publishes the bitmap (qemu:dirty-bitmap:%s), not from a file",
                   c->extents_from, c->bitmap);
      goto fail;
    }
    map0 = rw_open(c->extents_from, false, c->bitmap, err);
    if (map0 == NULL)
      goto fail;
  }
  bool try_zc = false;
  if (cfg->zero_copy != VF_ZERO_COPY_OFF) {
    const char *why = zc_ruled_out(c, map0 != NULL);
    if (why && cfg->zero_copy == VF_ZERO_COPY_ON) {
      vf_set_error(err, VF_ERR_ENDPOINT, ENOTSUP, "zero-copy is not possible: %s", why);
      goto fail;
    }
    if (why && why != c->zc_note)
      snprintf(c->zc_note, sizeof c->zc_note, "%s", why);
    try_zc = why == NULL;
  }
  if (try_zc) {
    src0 = zc_open(c->src, false, map0 ? NULL : c->bitmap, err);
    if (src0 == NULL && !zc_fallback(c, err))
      goto fail;
    try_zc = src0 != NULL;
  }
  if (src0 == NULL)
    src0 = rw_open(c->src, false, map0 ? NULL : c->bitmap, err);
  if (src0 == NULL)
    goto fail;
  c->size = (uint64_t)src0->size;
  c->start = cfg->range_start;
  c->end = cfg->range_end ? cfg->range_end : c->size;
  if (c->start > c->end || c->end > c->size) {
    vf_set_error(err, VF_ERR_USAGE, EINVAL,
                 "the range %llu-%llu is not within %s (%llu bytes)",
                 (unsigned long long)c->start, (unsigned long long)c->end, c->src,
                 (unsigned long long)c->size);
    goto fail;
  }
  if (map0 && (uint64_t)map0->size != c->size) {
    /* Extents of another disk would copy the wrong blocks. */
    vf_set_error(err, VF_ERR_ENDPOINT, EINVAL,
                 "%s (%lld bytes) is not the same disk as %s (%llu bytes): "
                 "extents must come from the source's own export",
                 c->extents_from, (long long)map0->size, c->src,
                 (unsigned long long)c->size);
    goto fail;
  }
  if (endpoint_create(c->dst, c->size, &c->created_dst, err) == -1)
    goto fail;
  if (try_zc) {
    dst0 = zc_open(c->dst, true, NULL, err);
    if (dst0 == NULL) {
      if (!zc_fallback(c, err))
        goto fail;
      /* rare (a server that cannot promise unfragmented reads, or TLS
       * after all): the source goes back to libnbd too */
      src0->ops->close(src0);
      src0 = rw_open(c->src, false, map0 ? NULL : c->bitmap, err);
      if (src0 == NULL)
        goto fail;
      try_zc = false;
    }
  }
  if (dst0 == NULL)
    dst0 = rw_open(c->dst, true, NULL, err);
  if (dst0 == NULL)
    goto fail;
  c->zc = try_zc;
  if ((uint64_t)dst0->size < c->size) {
    vf_set_error(err, VF_ERR_ENDPOINT, ENOSPC,
                 "destination %s is smaller (%lld bytes) than source %s "
                 "(%llu bytes): grow the destination first",
                 c->dst, (long long)dst0->size, c->src,
                 (unsigned long long)c->size);
    goto fail;
  }
  /* One large read each before the copy's requests (nbd_ops.c says why);
   * not when the user bounded the requests' size or the rate, which that
   * read would break. */
  bool warm = !cfg->no_warm && !cfg->request_size && !cfg->rate;
  if (warm && src0->ops->warm)
    src0->ops->warm(src0);
  if (warm && dst0->ops->warm)
    dst0->ops->warm(dst0);

  c->request_size = cfg->request_size ? cfg->request_size
                    : c->zc ? VF_ZC_REQUEST_SIZE : VF_DEFAULT_REQUEST_SIZE;
  /* A paced copy's requests cost at most the time it may run ahead, or
   * the first of the large zero-copy ones alone would break the limit. */
  while (!cfg->request_size && cfg->rate && c->request_size > 64 * 1024 &&
         c->request_size > cfg->rate * RATE_AHEAD_NS / 1000000000)
    c->request_size /= 2;
  /* Never send a data request larger than either server accepts. */
  if (src0->max_request && c->request_size > src0->max_request)
    c->request_size = src0->max_request;
  if (dst0->max_request && c->request_size > dst0->max_request)
    c->request_size = dst0->max_request;

  /* Several connections are only safe when both servers promise that
   * they see each other's writes (multi-conn); nbdcopy falls back the
   * same way. */
  bool multi = (src0->multi_conn && dst0->multi_conn) || cfg->force_multi_conn;
  long cpus = online_cpus();
  /* Zero-copy lanes cost this process next to nothing, so the servers set
   * the pace, and a server's connections share its one event loop: more of
   * them only add switching.  Half the CPUs, at most the libnbd lanes'
   * default: on 2 cores one connection was 5-30% faster than four in every
   * case of bench/results/zc_sizes.md. */
  unsigned conns = !c->zc ? VF_DEFAULT_CONNECTIONS
                   : cpus / 2 < 1 ? 1
                   : cpus / 2 > VF_DEFAULT_CONNECTIONS ? VF_DEFAULT_CONNECTIONS
                   : (unsigned)(cpus / 2);
  c->nlanes = cfg->connections ? cfg->connections : conns;
  if (!multi)
    c->nlanes = 1;
  /* Between two NBD servers, half the CPUs: the servers usually share the
   * machine, and one thread drives several connections well (on 2 cores one
   * thread beat two by 5-15%).  With a file or null: at one end, this
   * process does that end's work itself, so it gets every CPU. */
  bool two_servers = src0->ops->served && dst0->ops->served;
  unsigned threads = cfg->threads ? cfg->threads
                     : (unsigned)(two_servers && cpus > 1 ? cpus / 2 : cpus);
  c->nworkers = threads < c->nlanes ? threads : c->nlanes;

  c->lanes = calloc(c->nlanes, sizeof *c->lanes);
  c->workers = calloc(c->nworkers, sizeof *c->workers);
  if (c->lanes == NULL || c->workers == NULL) {
    vf_set_error(err, VF_ERR_IO, ENOMEM, "out of memory");
    goto fail;
  }
  /* A zero-copy NBD source must plan before its socket carries spliced
   * data.  A file plans up front too: on tmpfs every SEEK_HOLE walks the
   * page cache to the next hole, so asking per work range walks a dense
   * file once per range (a fifth of the client's CPU at 1 GiB), one pass
   * walks it once. */
  if (map0 == NULL && src0->ops->plan_up_front && fetch_plan(c, src0, err) == -1)
    goto fail;
  c->lanes[0].src = src0;
  c->lanes[0].dst = dst0;
  src0 = dst0 = NULL;
  unsigned requests = cfg->requests ? cfg->requests
                      : c->zc ? VF_ZC_REQUESTS : VF_DEFAULT_REQUESTS;
  uint64_t budget = cfg->buffer_bytes ? cfg->buffer_bytes : VF_DEFAULT_BUFFER_BYTES;
  uint64_t bufs = budget / c->request_size / c->nlanes;
  if (bufs < 2)
    bufs = 2;
  for (i = 0; i < c->nlanes; i++) {
    struct lane *l = &c->lanes[i];
    if (i > 0) {
      l->src = c->lanes[0].src->ops->open_again(c->lanes[0].src, err);
      if (l->src == NULL)
        goto fail;
      l->dst = c->lanes[0].dst->ops->open_again(c->lanes[0].dst, err);
      if (l->dst == NULL)
        goto fail;
    }
    l->max_in_flight = requests;
    l->zc = c->zc;
    l->max_bufs = bufs < requests ? (unsigned)bufs : requests;
  }

  /* Enough ranges that every lane has work until near the end. */
  uint64_t range = (c->end - c->start) / (c->nlanes * 4);
  if (range > MAX_RANGE)
    range = MAX_RANGE;
  if (range < MIN_RANGE)
    range = MIN_RANGE;
  c->range_size = (range + c->request_size - 1) / c->request_size * c->request_size;
  c->nranges = (c->end - c->start + c->range_size - 1) / c->range_size;
  c->next_offset = c->start;
  c->pending = calloc(c->nranges ? c->nranges : 1, sizeof *c->pending);
  if (c->pending == NULL) {
    vf_set_error(err, VF_ERR_IO, ENOMEM, "out of memory");
    goto fail;
  }

  for (i = 0; i < c->nworkers; i++) {
    struct worker *w = &c->workers[i];
    w->c = c;
    w->lanes = calloc(c->nlanes, sizeof *w->lanes);
    w->pfds = calloc(2 * c->nlanes + 1, sizeof *w->pfds);
    w->pfd_rw = calloc(2 * c->nlanes + 1, sizeof *w->pfd_rw);
    if (w->lanes == NULL || w->pfds == NULL || w->pfd_rw == NULL) {
      vf_set_error(err, VF_ERR_IO, ENOMEM, "out of memory");
      goto fail;
    }
    /* One extents connection per worker: no lock around block status.
     * Worker 0 takes map0 itself, the others open their own from it. */
    if (c->extents_from) {
      struct rw *first = c->workers[0].map;
      w->map = i == 0 ? map0 : first->ops->open_again(first, err);
      map0 = NULL;
      if (w->map == NULL)
        goto fail;
    }
  }

  for (i = 0; i < c->nlanes; i++) {
    struct worker *w = &c->workers[i % c->nworkers];
    c->lanes[i].w = w;
    w->lanes[w->nlanes++] = &c->lanes[i];
  }
  c->wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (c->wakefd == -1) {
    vf_set_error(err, VF_ERR_IO, errno, "eventfd: %s", strerror(errno));
    goto fail;
  }
  return c;

fail:
  if (src0)
    src0->ops->close(src0);
  if (dst0)
    dst0->ops->close(dst0);
  if (map0)
    map0->ops->close(map0);
  vf_copy_close(c);
  return NULL;
}

int
vf_copy_run(struct vf_copy *c, struct vf_error *err)
{
  unsigned i, started = 0;

  if (c->ran)
    return vf_set_error(err, VF_ERR_USAGE, EINVAL, "a copy can only run once");
  c->ran = true;
  for (i = 0; i < c->nworkers; i++) {
    int r = pthread_create(&c->workers[i].tid, NULL, worker_run, &c->workers[i]);
    if (r != 0) {
      fail(c, VF_ERR_IO, r, "cannot start a copy thread: %s", strerror(r));
      break;
    }
    started++;
  }
  for (i = 0; i < started; i++)
    pthread_join(c->workers[i].tid, NULL);

  if (!stopping(c) && c->cfg.flush) {
    for (i = 0; i < c->nlanes; i++) {
      struct vf_error e = { 0 };
      if (c->lanes[i].dst->ops->flush(c->lanes[i].dst, &e) == -1) {
        fail_with(c, &e);
        break;
      }
    }
  }
  if (stopping(c) == STOP_CANCEL && c->err.kind == VF_ERR_NONE)
    fail(c, VF_ERR_CANCELLED, ECANCELED, "copy cancelled");
  if (c->err.kind != VF_ERR_NONE) {
    *err = c->err;
    return -1;
  }
  /* The copy succeeded: the destination file is the user's now. */
  c->created_dst = false;
  return 0;
}

void
vf_copy_cancel(struct vf_copy *c)
{
  uint64_t one = 1;
  int expected = RUNNING;

  __atomic_compare_exchange_n(&c->stop, &expected, STOP_CANCEL, false,
                              __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
  if (c->wakefd >= 0)
    (void)!write(c->wakefd, &one, sizeof one);
}

void
vf_copy_counters(struct vf_copy *c, struct vf_counters *out)
{
  memset(out, 0, sizeof *out);
  out->total = c->end - c->start;
  out->done_below = done_below(c);
  for (unsigned i = 0; i < c->nlanes; i++) {
    struct lane *l = &c->lanes[i];
    out->read += __atomic_load_n(&l->read, __ATOMIC_RELAXED);
    out->written += __atomic_load_n(&l->written, __ATOMIC_RELAXED);
    out->zeroed += __atomic_load_n(&l->zeroed, __ATOMIC_RELAXED);
    out->skipped += __atomic_load_n(&l->skipped, __ATOMIC_RELAXED);
  }
}

unsigned
vf_copy_connections(const struct vf_copy *c)
{
  return c->nlanes;
}

int
vf_copy_zero_copy(const struct vf_copy *c)
{
  return c->zc;
}

const char *
vf_copy_zero_copy_note(const struct vf_copy *c)
{
  return c->zc ? "" : c->zc_note;
}

void
vf_copy_close(struct vf_copy *c)
{
  unsigned i;

  if (c == NULL)
    return;
  /* Connections first: a dead server's callbacks may still fire while
   * libnbd closes, and they need the lanes intact. */
  for (i = 0; c->lanes && i < c->nlanes; i++) {
    if (c->lanes[i].src)
      c->lanes[i].src->ops->close(c->lanes[i].src);
    if (c->lanes[i].dst)
      c->lanes[i].dst->ops->close(c->lanes[i].dst);
  }
  for (i = 0; c->lanes && i < c->nlanes; i++) {
    struct lane *l = &c->lanes[i];
    while (l->free_bufs) {
      struct buffer *b = l->free_bufs;
      l->free_bufs = b->next_free;
      free(b->data);
      free(b);
    }
    while (l->free_cmds) {
      struct command *cmd = l->free_cmds;
      l->free_cmds = cmd->next_free;
      free(cmd);
    }
  }
  for (i = 0; c->workers && i < c->nworkers; i++) {
    if (c->workers[i].map)
      c->workers[i].map->ops->close(c->workers[i].map);
    free(c->workers[i].lanes);
    free(c->workers[i].pfds);
    free(c->workers[i].pfd_rw);
    free(c->workers[i].ext.v);
  }
  free(c->plan.v);
  /* Nothing half-copied is left behind in a file we made. */
  if (c->created_dst)
    unlink(c->dst);
  if (c->wakefd >= 0)
    close(c->wakefd);
  pthread_mutex_destroy(&c->lock);
  free(c->pending);
  free(c->lanes);
  free(c->workers);
  free(c->src);
  free(c->dst);
  free(c->bitmap);
  free(c->extents_from);
  free(c);
}
