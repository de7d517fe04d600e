/* NBD endpoints through libnbd's asynchronous API.
 *
 * One struct nbd_rw per connection.  A copy worker owns its connections and
 * is the only thread that touches them, so nothing here takes a lock beyond
 * libnbd's own per-handle one.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sys/mman.h>
#include <sys/socket.h>
#include <netinet/in.h>

#include <libnbd.h>
#include <pthread.h>

#include "internal.h"

struct nbd_rw {
  struct rw rw;               /* must be first */
  struct nbd_handle *h;
  struct nbd_names names;
  bool writable;
};

static const struct rw_ops nbd_ops;

#define SOCKET_BUFFER (4 * 1024 * 1024)

/* libnbd keeps its last error per thread; copy it out before anything else
 * can overwrite it. */
int
nbd_error(struct vf_error *err, int kind, const char *what, const char *name)
{
  int e = nbd_get_errno();
  return vf_set_error(err, kind, e ? e : EIO, "%s %s: %s", what, name,
                      nbd_get_error() ? nbd_get_error() : "unknown error");
}

/* Bigger socket buffers let a 256 KiB request go out in one send() and
 * its reply come back in few reads; the default (~200 KiB on Unix
 * sockets) splits every request into several poll/send rounds. */
static void
tune_socket(struct nbd_handle *h)
{
  int fd = nbd_aio_get_fd(h);
  int size = SOCKET_BUFFER;
  if (fd >= 0) {
    (void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    (void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
  }
}

/* Connects and checks what every NBD endpoint needs, and fills *names,
 * which the caller frees with nbd_names_free once it is done with the
 * handle.  Shared with the zero-copy kind (nbd_raw.c), which takes the
 * socket over afterwards. */
struct nbd_handle *
nbd_connect_checked(const char *uri, bool writable, const char *bitmap,
                    bool structured, struct nbd_names *names, struct vf_error *err)
{
  struct nbd_handle *h;
  char ctx[300];

  *names = (struct nbd_names){ 0 };
  if (nbd_uri_check(uri, err) == -1)
    return NULL;
  /* Copied before connecting: a server that serves one client must not be
   * connected to only to be dropped for want of memory. */
  names->uri = strdup(uri);
  names->bitmap = bitmap ? strdup(bitmap) : NULL;
  if (names->uri == NULL || (bitmap && names->bitmap == NULL)) {
    vf_set_error(err, VF_ERR_IO, ENOMEM, "out of memory");
    nbd_names_free(names);
    return NULL;
  }
  h = nbd_create();
  if (h == NULL) {
    nbd_error(err, VF_ERR_CONNECT, "cannot create a handle for", uri);
    nbd_names_free(names);
    return NULL;
  }
  if (!structured)
    nbd_set_request_structured_replies(h, false);
  if (bitmap) {
    snprintf(ctx, sizeof ctx, "qemu:dirty-bitmap:%s", bitmap);
    if (nbd_add_meta_context(h, ctx) == -1) {
      nbd_error(err, VF_ERR_USAGE, "bad bitmap name for", uri);
      goto fail;
    }
  } else {
    snprintf(ctx, sizeof ctx, "%s", LIBNBD_CONTEXT_BASE_ALLOCATION);
    if (nbd_add_meta_context(h, ctx) == -1) {
      nbd_error(err, VF_ERR_CONNECT, "cannot ask for extents of", uri);
      goto fail;
    }
  }
  /* The user typed this URI, so its tls-certificates= or tls-psk-file=
   * may name local files, as nbdcopy allows. */
  nbd_set_uri_allow_local_file(h, true);
  if (nbd_connect_uri(h, uri) == -1) {
    /* libnbd reports a URI it cannot parse with EINVAL before connecting. */
    int e = nbd_get_errno();
    nbd_error(err, e == EINVAL && nbd_aio_is_created(h) ? VF_ERR_USAGE
                                                        : VF_ERR_CONNECT,
              "cannot connect to", uri);
    goto fail;
  }
  /* The engine always fills whole buffers from the server, so libnbd's
   * defensive memset of every read buffer is pure overhead. */
  nbd_set_pread_initialize(h, false);
  tune_socket(h);
  if (nbd_can_meta_context(h, ctx) == 1) {
    names->context = strdup(ctx);
    if (names->context == NULL) {
      vf_set_error(err, VF_ERR_IO, ENOMEM, "out of memory");
      goto fail;
    }
  } else if (bitmap) {
    vf_set_error(err, VF_ERR_ENDPOINT, ENOENT,
                 "%s does not publish dirty bitmap '%s' (meta context %s): "
                 "export it with the bitmap, e.g. block-export-add bitmaps=[%s]",
                 uri, bitmap, ctx, bitmap);
    goto fail;
  }
  if (writable && nbd_is_read_only(h) == 1) {
    vf_set_error(err, VF_ERR_ENDPOINT, EROFS,
                 "destination %s is read-only: export it writable", uri);
    goto fail;
  }
  if (nbd_get_size(h) < 0) {
    nbd_error(err, VF_ERR_CONNECT, "cannot get the size of", uri);
    goto fail;
  }
  return h;

fail:
  nbd_names_free(names);
  nbd_close(h);
  return NULL;
}

void
nbd_names_free(struct nbd_names *names)
{
  free(names->uri);
  free(names->bitmap);
  free(names->context);
  *names = (struct nbd_names){ 0 };
}

/* What the copy loop needs to know of a connected server. */
void
nbd_describe(struct nbd_handle *h, struct rw *rw)
{
  rw->size = nbd_get_size(h);
  rw->multi_conn = nbd_can_multi_conn(h) == 1;
  rw->can_zero = nbd_can_zero(h) == 1;
  rw->splice_fd = -1;
  int64_t max = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
  rw->max_request = max > 0 && max < UINT32_MAX ? (uint32_t)max : 0;
}

/* qemu-nbd and QEMU's NBD server malloc a buffer for every read or write
 * and free it once the reply is out.  glibc serves a buffer above its mmap
 * threshold (128 KiB at first) with mmap, and gives heap back whenever the
 * free space at its top passes twice that threshold, so a copy's requests
 * (512 KiB to 2 MiB) fault in and zero fresh pages every time: perf showed
 * that as most of a destination qemu-nbd's one thread, the bottleneck of a
 * copy.  glibc raises the threshold to the largest mmapped buffer freed (up
 * to 32 MiB), so one read that large first keeps every later buffer in a
 * heap that stays put; the servers then spent half the CPU and the copy
 * half the time (bench/results/zerocopy.md).  A read changes nothing, a hole
 * costs no payload with structured replies, and it is best effort: a server
 * that fails it is no worse off, and one that died says so at the next
 * command. */
#define WARM_BYTES (31 * 1024 * 1024)     /* a mmapped chunk of at most 32 MiB */
#define WARM_MIN   (1024 * 1024)

/* A server on this host: a Unix socket, or TCP whose two ends share an
 * address. */
static bool
socket_is_local(int fd)
{
  struct sockaddr_storage me, peer;
  socklen_t ml = sizeof me, pl = sizeof peer;
  if (fd < 0 || getsockname(fd, (struct sockaddr *)&me, &ml) == -1 ||
      getpeername(fd, (struct sockaddr *)&peer, &pl) == -1)
    return false;
  if (me.ss_family == AF_UNIX)
    return true;
  if (me.ss_family == AF_INET && peer.ss_family == AF_INET)
    return ((struct sockaddr_in *)&me)->sin_addr.s_addr ==
           ((struct sockaddr_in *)&peer)->sin_addr.s_addr;
  if (me.ss_family == AF_INET6 && peer.ss_family == AF_INET6)
    return memcmp(&((struct sockaddr_in6 *)&me)->sin6_addr,
                  &((struct sockaddr_in6 *)&peer)->sin6_addr, sizeof(struct in6_addr)) == 0;
  return false;
}

/* How much that read asks for; 0: none.  Only a server that says it takes
 * requests that large is asked (QEMU's say 32 MiB; nbdkit says nothing, and
 * behind its rate or delay filters such a read would cost seconds).  A
 * destination's answer flows against the copy, on the half of a link the
 * copy leaves idle, and from a hole (nbd_warm_offset); a source's flows with
 * it, so a remote source is not asked. */
uint64_t
nbd_warm_length(struct nbd_handle *h, const struct rw *rw, bool source)
{
  if (rw->max_request < WARM_BYTES)
    return 0;
  if (source && !socket_is_local(nbd_aio_get_fd(h)))
    return 0;
  uint64_t n = WARM_BYTES;
  if ((uint64_t)rw->size < n)
    n = (uint64_t)rw->size & ~(uint64_t)4095;
  return n < WARM_MIN ? 0 : n;
}

/* Where that read of N bytes goes: on a destination, its first hole that
 * long, whose answer is one chunk of a few bytes however slow the link
 * (a presynced disk keeps data at its start); else the start. */
uint64_t
nbd_warm_offset(struct nbd_handle *h, const struct nbd_names *names,
                const struct rw *rw, uint64_t n, bool source)
{
  struct extent_list l = { 0 };
  struct vf_error e = { 0 };
  uint64_t size = (uint64_t)rw->size, off = 0, run_start = 0, run = 0, found = 0;

  if (source || names->context == NULL || names->bitmap != NULL)
    return 0;
  for (int asks = 0; off < size && asks < 16 && found == 0; asks++) {
    l.len = 0;
    if (nbd_handle_extents(h, names, off, size - off, &l, &e) == -1 || l.len == 0)
      break;
    for (size_t i = 0; i < l.len && found == 0; i++) {
      const struct extent *x = &l.v[i];
      if (x->type != EXT_ZERO) {
        run = 0;
        continue;
      }
      if (run == 0)
        run_start = x->offset;
      run += x->length;
      if (run >= n && run_start + n <= size)
        found = run_start + 1;          /* +1: offset 0 is a find too */
    }
    off = l.v[l.len - 1].offset + l.v[l.len - 1].length;
  }
  free(l.v);
  return found ? found - 1 : 0;
}

void
nbd_warm_server(struct nbd_handle *h, const struct nbd_names *names,
                const struct rw *rw, bool source)
{
  uint64_t n = nbd_warm_length(h, rw, source);
  if (n == 0)
    return;
  uint64_t at = nbd_warm_offset(h, names, rw, n, source);
  void *buf = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (buf == MAP_FAILED)
    return;
  (void)nbd_pread(h, buf, n, at, 0);
  munmap(buf, n);
}

static void
nbd_warm(struct rw *rw)
{
  struct nbd_rw *n = (struct nbd_rw *)rw;
  nbd_warm_server(n->h, &n->names, rw, !n->writable);
}

static struct rw *
connect_one(const char *uri, bool writable, const char *bitmap,
            struct vf_error *err)
{
  struct nbd_rw *n = calloc(1, sizeof *n);

  if (n == NULL) {
    vf_set_error(err, VF_ERR_IO, ENOMEM, "out of memory");
    return NULL;
  }
  n->h = nbd_connect_checked(uri, writable, bitmap, true, &n->names, err);
  if (n->h == NULL) {
    free(n);
    return NULL;
  }
  n->rw.ops = &nbd_ops;
  n->writable = writable;
  n->rw.name = n->names.uri;
  nbd_describe(n->h, &n->rw);
  return &n->rw;
}

struct rw *
nbd_rw_open(const char *uri, bool writable, const char *bitmap,
            struct vf_error *err)
{
  return connect_one(uri, writable, bitmap, err);
}

static struct rw *
nbd_open_again(struct rw *rw, struct vf_error *err)
{
  struct nbd_rw *n = (struct nbd_rw *)rw;
  return connect_one(n->names.uri, n->writable, n->names.bitmap, err);
}

static void
nbd_rw_close(struct rw *rw)
{
  struct nbd_rw *n = (struct nbd_rw *)rw;

  /* A polite NBD_CMD_DISC lets the server finish cleanly; on a dead
   * connection it fails at once and nbd_close just drops the socket. */
  if (!nbd_aio_is_dead(n->h) && !nbd_aio_is_closed(n->h))
    nbd_shutdown(n->h, 0);
  nbd_close(n->h);
  nbd_names_free(&n->names);
  free(n);
}

struct extent_ctx {
  const char *context;
  bool bitmap;
  uint64_t offset, end;
  struct extent_list *out;
  int failed;
};

static int
extent_cb(void *opaque, const char *metacontext, uint64_t offset,
          uint32_t *entries, size_t nr_entries, int *error)
{
  struct extent_ctx *x = opaque;
  size_t i;

  if (strcmp(metacontext, x->context) != 0)
    return 0;
  for (i = 0; i + 1 < nr_entries && offset < x->end; i += 2) {
    uint64_t len = entries[i];
    uint32_t flags = entries[i + 1];
    enum extent_type t;

    if (offset + len > x->end)
      len = x->end - offset;
    if (x->bitmap)
      t = (flags & 1) ? EXT_DATA : EXT_SKIP;     /* bit 0: dirty */
    else
      t = (flags & LIBNBD_STATE_ZERO) ? EXT_ZERO : EXT_DATA;
    if (extent_append(x->out, offset, len, t) == -1) {
      x->failed = ENOMEM;
      return -1;
    }
    offset += len;
  }
  return 0;
}

/* Block status of [offset, offset+count) from names->context into out;
 * shared with nbd_raw.c, which plans from it before its socket carries data. */
int
nbd_handle_extents(struct nbd_handle *h, const struct nbd_names *names,
                   uint64_t offset, uint64_t count,
                   struct extent_list *out, struct vf_error *err)
{
  size_t before = out->len;

  if (names->context == NULL)
    return extent_append(out, offset, count, EXT_DATA);
  /* The protocol's length field is 32 bits. */
  if (count > (1U << 31))
    count = 1U << 31;
  struct extent_ctx x = {
    .context = names->context, .bitmap = names->bitmap != NULL,
    .offset = offset, .end = offset + count, .out = out,
  };
  if (nbd_block_status(h, count, offset,
                       (nbd_extent_callback){ .callback = extent_cb, .user_data = &x },
                       0) == -1)
    return nbd_error(err, VF_ERR_IO, "cannot read extents of", names->uri);
  if (x.failed)
    return vf_set_error(err, VF_ERR_IO, x.failed, "out of memory");
  /* A server may legally answer with nothing useful; treat it as data
   * (never as skippable) so nothing is ever lost. */
  if (out->len == before)
    return extent_append(out, offset, count, EXT_DATA);
  return 0;
}

static int
nbd_extents(struct rw *rw, uint64_t offset, uint64_t count,
            struct extent_list *out, struct vf_error *err)
{
  struct nbd_rw *n = (struct nbd_rw *)rw;
  return nbd_handle_extents(n->h, &n->names, offset, count, out, err);
}

static int
completed(void *opaque, int *error)
{
  struct command *cmd = opaque;
  cmd->done(cmd, *error);
  return 1;   /* retire the command; we keep no cookie */
}

#define CB(cmd) ((nbd_completion_callback){ .callback = completed, .user_data = (cmd) })

static int
nbd_start_read(struct rw *rw, struct command *cmd, struct vf_error *err)
{
  struct nbd_rw *n = (struct nbd_rw *)rw;
  if (nbd_aio_pread(n->h, cmd->data, cmd->length, cmd->offset, CB(cmd), 0) == -1)
    return nbd_error(err, VF_ERR_IO, "cannot read from", rw->name);
  return 0;
}

static int
nbd_start_write(struct rw *rw, struct command *cmd, struct vf_error *err)
{
  struct nbd_rw *n = (struct nbd_rw *)rw;
  if (nbd_aio_pwrite(n->h, cmd->data, cmd->length, cmd->offset, CB(cmd), 0) == -1)
    return nbd_error(err, VF_ERR_IO, "cannot write to", rw->name);
  return 0;
}

static int
nbd_start_zero(struct rw *rw, struct command *cmd, bool allocate,
               struct vf_error *err)
{
  struct nbd_rw *n = (struct nbd_rw *)rw;
  uint32_t flags = allocate ? LIBNBD_CMD_FLAG_NO_HOLE : 0;
  if (nbd_aio_zero(n->h, cmd->length, cmd->offset, CB(cmd), flags) == -1)
    return nbd_error(err, VF_ERR_IO, "cannot zero", rw->name);
  return 0;
}

static int
nbd_poll_fd(struct rw *rw, short *events)
{
  struct nbd_rw *n = (struct nbd_rw *)rw;
  unsigned dir;

  if (nbd_aio_is_dead(n->h) || nbd_aio_is_closed(n->h))
    return -1;
  dir = nbd_aio_get_direction(n->h);
  *events = 0;
  if (dir & LIBNBD_AIO_DIRECTION_READ)
    *events |= POLLIN;
  if (dir & LIBNBD_AIO_DIRECTION_WRITE)
    *events |= POLLOUT;
  return *events ? nbd_aio_get_fd(n->h) : -1;
}

static int
nbd_notify(struct rw *rw, short revents, struct vf_error *err)
{
  struct nbd_rw *n = (struct nbd_rw *)rw;

  /* Hang-ups are read events too: reading is how libnbd learns the
   * server has gone, and it then fails every command in flight. */
  if (revents & (POLLIN | POLLHUP | POLLERR)) {
    if (nbd_aio_notify_read(n->h) == -1)
      return nbd_error(err, VF_ERR_IO, "lost connection to", rw->name);
  }
  if (revents & POLLOUT) {
    if (nbd_aio_notify_write(n->h) == -1)
      return nbd_error(err, VF_ERR_IO, "lost connection to", rw->name);
  }
  return 0;
}

static int
nbd_rw_flush(struct rw *rw, struct vf_error *err)
{
  struct nbd_rw *n = (struct nbd_rw *)rw;
  if (nbd_can_flush(n->h) != 1)
    return 0;
  if (nbd_flush(n->h, 0) == -1)
    return nbd_error(err, VF_ERR_IO, "cannot flush", rw->name);
  return 0;
}

static int
nbd_sync_pread(struct rw *rw, void *buf, size_t count, uint64_t offset,
               struct vf_error *err)
{
  struct nbd_rw *n = (struct nbd_rw *)rw;
  if (nbd_pread(n->h, buf, count, offset, 0) == -1)
    return nbd_error(err, VF_ERR_IO, "cannot read from", rw->name);
  return 0;
}

static int
nbd_sync_pwrite(struct rw *rw, const void *buf, size_t count, uint64_t offset,
                struct vf_error *err)
{
  struct nbd_rw *n = (struct nbd_rw *)rw;
  if (nbd_pwrite(n->h, buf, count, offset, 0) == -1)
    return nbd_error(err, VF_ERR_IO, "cannot write to", rw->name);
  return 0;
}

static int
nbd_sync_zero(struct rw *rw, uint64_t count, uint64_t offset, bool allocate,
              struct vf_error *err)
{
  struct nbd_rw *n = (struct nbd_rw *)rw;
  if (nbd_zero(n->h, count, offset, allocate ? LIBNBD_CMD_FLAG_NO_HOLE : 0) == -1)
    return nbd_error(err, VF_ERR_IO, "cannot zero", rw->name);
  return 0;
}

static const struct rw_ops nbd_ops = {
  .kind = "nbd",
  .served = true,
  .open_again = nbd_open_again,
  .close = nbd_rw_close,
  .extents = nbd_extents,
  .start_read = nbd_start_read,
  .start_write = nbd_start_write,
  .start_zero = nbd_start_zero,
  .poll_fd = nbd_poll_fd,
  .notify = nbd_notify,
  .flush = nbd_rw_flush,
  .warm = nbd_warm,
  .pread = nbd_sync_pread,
  .pwrite = nbd_sync_pwrite,
  .zero = nbd_sync_zero,
};

/* libnbd reports its version through a handle; one is made once for it. */
static char libnbd_version[32] = "unknown";
static pthread_once_t libnbd_version_once = PTHREAD_ONCE_INIT;

static void
read_libnbd_version(void)
{
  struct nbd_handle *h = nbd_create();
  const char *v = h ? nbd_get_version(h) : NULL;
  if (v)
    snprintf(libnbd_version, sizeof libnbd_version, "%s", v);
  if (h)
    nbd_close(h);
}

const char *
vf_libnbd_version(void)
{
  pthread_once(&libnbd_version_once, read_libnbd_version);
  return libnbd_version;
}
