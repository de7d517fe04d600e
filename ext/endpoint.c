/* Picks an endpoint kind from what the user typed, as nbdcopy does:
 * NBD URIs, "null:", or a local path.  Also the synchronous vf_endpoint_*
 * API that lets Python read into and write from its own buffers. */
#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static bool
has_prefix(const char *s, const char *prefix)
{
  return strncmp(s, prefix, strlen(prefix)) == 0;
}

/* libnbd would try to connect to "" and say "connection refused"; an empty
 * socket path is a typo, so say that instead. */
int
nbd_uri_check(const char *uri, const char *scheme, struct vf_error *err)
{
  if (strstr(scheme, "+unix") != NULL) {
    const char *q = strstr(uri, "socket=");
    if (q == NULL || q[7] == '\0' || q[7] == '&')
      return vf_set_error(err, VF_ERR_USAGE, EINVAL,
                          "%s has no socket path: use %s/EXPORT?socket=PATH", uri, scheme);
  }
  return 0;
}

struct rw *
rw_open(const char *uri, bool writable, const char *bitmap, struct vf_error *err)
{
  static const char *const nbd_schemes[] = {
    "nbd://", "nbds://", "nbd+unix://", "nbds+unix://", "nbd+vsock://",
    "nbds+vsock://", NULL,
  };
  const char *const *s;

  if (uri == NULL || *uri == '\0') {
    vf_set_error(err, VF_ERR_USAGE, EINVAL, "empty endpoint: give an NBD URI, a path or null:");
    return NULL;
  }
  for (s = nbd_schemes; *s; s++) {
    if (!has_prefix(uri, *s))
      continue;
    if (nbd_uri_check(uri, *s, err) == -1)
      return NULL;
    return nbd_rw_open(uri, writable, bitmap, err);
  }
  if (bitmap) {
    vf_set_error(err, VF_ERR_USAGE, EINVAL,
                 "--bitmap needs an NBD source that publishes the bitmap, not %s", uri);
    return NULL;
  }
  if (strcmp(uri, "null:") == 0) {
    if (!writable) {
      vf_set_error(err, VF_ERR_USAGE, EINVAL, "null: can only be a destination");
      return NULL;
    }
    return null_rw_open(err);
  }
  if (strstr(uri, "://") != NULL || has_prefix(uri, "nbd:")) {
    vf_set_error(err, VF_ERR_USAGE, EINVAL,
                 "unsupported URI %s: use nbd://, nbds://, nbd+unix://, a path or null:",
                 uri);
    return NULL;
  }
  return file_rw_open(uri, writable, err);
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
vf_endpoint_close(struct vf_endpoint *ep)
{
  if (ep == NULL)
    return;
  ep->rw->ops->close(ep->rw);
  free(ep);
}
