/* Picks an endpoint kind from what the user typed, as nbdcopy does:
 * NBD URIs, "null:", or a local path.  Also the synchronous vf_endpoint_*
 * API that lets Python read into and write from its own buffers. */
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

static bool
has_prefix(const char *s, const char *prefix)
{
  return strncmp(s, prefix, strlen(prefix)) == 0;
}

enum uri_kind
uri_kind(const char *uri)
{
  static const struct {
    const char *scheme;
    enum uri_kind kind;
  } nbd_schemes[] = {
    { "nbd://", URI_NBD_PLAIN }, { "nbds://", URI_NBD },
    { "nbd+unix://", URI_NBD_PLAIN }, { "nbds+unix://", URI_NBD },
    { "nbd+vsock://", URI_NBD }, { "nbds+vsock://", URI_NBD },
  };

  if (uri == NULL || *uri == '\0')
    return URI_EMPTY;
  for (size_t i = 0; i < sizeof nbd_schemes / sizeof nbd_schemes[0]; i++)
    if (has_prefix(uri, nbd_schemes[i].scheme))
      return nbd_schemes[i].kind;
  if (strcmp(uri, "null:") == 0)
    return URI_NULL;
  if (strstr(uri, "://") != NULL || has_prefix(uri, "nbd:"))
    return URI_UNSUPPORTED;
  return URI_FILE;
}

/* libnbd would try to connect to "" and say "connection refused"; an empty
 * socket path is a typo, so say that instead. */
int
nbd_uri_check(const char *uri, struct vf_error *err)
{
  const char *scheme = has_prefix(uri, "nbd+unix://") ? "nbd+unix://"
                       : has_prefix(uri, "nbds+unix://") ? "nbds+unix://" : NULL;

  if (scheme == NULL)
    return 0;
  const char *q = strstr(uri, "socket=");
  if (q == NULL || q[7] == '\0' || q[7] == '&')
    return vf_set_error(err, VF_ERR_USAGE, EINVAL,
                        "%s has no socket path: use %s/EXPORT?socket=PATH", uri, scheme);
  return 0;
}

struct rw *
rw_open(const char *uri, bool writable, const char *bitmap, struct vf_error *err)
{
  enum uri_kind kind = uri_kind(uri);

  if (kind == URI_EMPTY) {
    vf_set_error(err, VF_ERR_USAGE, EINVAL, "empty endpoint: give an NBD URI, a path or null:");
    return NULL;
  }
  if (kind == URI_NBD || kind == URI_NBD_PLAIN)
    return nbd_rw_open(uri, writable, bitmap, err);
  if (bitmap) {
    vf_set_error(err, VF_ERR_USAGE, EINVAL,
                 "--bitmap needs an NBD source that publishes the bitmap, not %s", uri);
    return NULL;
  }
  if (kind == URI_NULL) {
    if (!writable) {
      vf_set_error(err, VF_ERR_USAGE, EINVAL, "null: can only be a destination");
      return NULL;
    }
    return null_rw_open(err);
  }
  if (kind == URI_UNSUPPORTED) {
    vf_set_error(err, VF_ERR_USAGE, EINVAL,
                 "unsupported URI %s: use nbd://, nbds://, nbd+unix://, a path or null:",
                 uri);
    return NULL;
  }
  return file_rw_open(uri, writable, err);
}

/* A copy's destination path that does not exist yet is made here, with the
 * source's size, before any lane opens it.  *created is set as soon as the
 * file exists, even if sizing it then fails, so that the caller, which
 * owns it from then on, removes it when the copy does not succeed. */
int
endpoint_create(const char *uri, uint64_t size, bool *created,
                struct vf_error *err)
{
  *created = false;
  if (uri_kind(uri) != URI_FILE)
    return 0;
  int fd = open(uri, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd == -1) {
    int e = errno;
    if (e == EEXIST)
      return 0;
    return vf_set_error(err, VF_ERR_CONNECT, e, "cannot create %s: %s", uri,
                        strerror(e));
  }
  *created = true;
  if (ftruncate(fd, (off_t)size) == -1) {
    int e = errno;
    close(fd);
    return vf_set_error(err, VF_ERR_IO, e, "cannot size %s: %s", uri, strerror(e));
  }
  close(fd);
  return 0;
}

struct vf_endpoint {
  struct rw *rw;
  bool writable;
};

struct vf_endpoint *
vf_endpoint_open(const char *uri, int writable, struct vf_error *err)
{
  struct vf_endpoint *ep = calloc(1, sizeof *ep);
  if (ep == NULL) {
    vf_set_error(err, VF_ERR_IO, ENOMEM, "out of memory");
    return NULL;
  }
  ep->rw = rw_open(uri, writable != 0, NULL, err);
  if (ep->rw == NULL) {
    free(ep);
    return NULL;
  }
  ep->writable = writable != 0;
  return ep;
}

int64_t
vf_endpoint_size(struct vf_endpoint *ep)
{
  return ep->rw->size;
}

/* libnbd connections are always opened read-write; the promise not to
 * write is kept here. */
static int
check_writable(struct vf_endpoint *ep, struct vf_error *err)
{
  if (!ep->writable)
    return vf_set_error(err, VF_ERR_USAGE, EBADF,
                        "%s was opened read-only: open it with writable=True",
                        ep->rw->name);
  return 0;
}

static int
check_range(struct vf_endpoint *ep, uint64_t count, uint64_t offset,
            struct vf_error *err)
{
  if (offset > (uint64_t)ep->rw->size || count > (uint64_t)ep->rw->size - offset)
    return vf_set_error(err, VF_ERR_USAGE, EINVAL,
                        "request of %llu bytes at offset %llu is beyond the end of %s "
                        "(%lld bytes)", (unsigned long long)count,
                        (unsigned long long)offset, ep->rw->name,
                        (long long)ep->rw->size);
  return 0;
}

int
vf_endpoint_pread(struct vf_endpoint *ep, void *buf, size_t count,
                  uint64_t offset, struct vf_error *err)
{
  if (ep->rw->ops->pread == NULL)
    return vf_set_error(err, VF_ERR_USAGE, EINVAL, "%s cannot be read", ep->rw->name);
  if (check_range(ep, count, offset, err) == -1)
    return -1;
  return ep->rw->ops->pread(ep->rw, buf, count, offset, err);
}

int
vf_endpoint_pwrite(struct vf_endpoint *ep, const void *buf, size_t count,
                   uint64_t offset, struct vf_error *err)
{
  if (check_writable(ep, err) == -1 || check_range(ep, count, offset, err) == -1)
    return -1;
  return ep->rw->ops->pwrite(ep->rw, buf, count, offset, err);
}

int
vf_endpoint_zero(struct vf_endpoint *ep, uint64_t count, uint64_t offset,
                 struct vf_error *err)
{
  if (check_writable(ep, err) == -1 || check_range(ep, count, offset, err) == -1)
    return -1;
  return ep->rw->ops->zero(ep->rw, count, offset, false, err);
}

int
vf_endpoint_flush(struct vf_endpoint *ep, struct vf_error *err)
{
  return ep->rw->ops->flush(ep->rw, err);
}

void
vf_endpoint_warm(struct vf_endpoint *ep)
{
  if (ep->rw->ops->warm)
    ep->rw->ops->warm(ep->rw);
}

void
vf_endpoint_close(struct vf_endpoint *ep)
{
  if (ep == NULL)
    return;
  ep->rw->ops->close(ep->rw);
  free(ep);
}
