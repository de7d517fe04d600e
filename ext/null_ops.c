/* "null:": a destination that discards everything, for measuring how fast
 * a source can be read.  It cannot be a source. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>

#include "internal.h"

static const struct rw_ops null_ops;

struct rw *
null_rw_open(struct vf_error *err)
{
  struct rw *rw = calloc(1, sizeof *rw);
  if (rw == NULL) {
    vf_set_error(err, VF_ERR_IO, ENOMEM, "out of memory");
    return NULL;
  }
  rw->ops = &null_ops;
  rw->name = "null:";
  rw->size = INT64_MAX;
  rw->multi_conn = true;
  rw->can_zero = true;
  rw->splice_fd = -1;
  return rw;
}

static struct rw *
null_open_again(struct rw *rw, struct vf_error *err)
{
  (void)rw;
  return null_rw_open(err);
}

static void null_close(struct rw *rw) { free(rw); }

static int
null_complete(struct rw *rw, struct command *cmd, struct vf_error *err)
{
  (void)rw; (void)err;
  cmd->done(cmd, 0);
  return 0;
}

static int
null_start_zero(struct rw *rw, struct command *cmd, bool allocate,
                struct vf_error *err)
{
  (void)allocate;
  return null_complete(rw, cmd, err);
}

static int
null_poll_fd(struct rw *rw, short *events)
{
  (void)rw;
  *events = 0;
  return -1;
}

static int
null_notify(struct rw *rw, short revents, struct vf_error *err)
{
  (void)rw; (void)revents; (void)err;
  return 0;
}

static int null_flush(struct rw *rw, struct vf_error *err) { (void)rw; (void)err; return 0; }

static int
null_pwrite(struct rw *rw, const void *buf, size_t count, uint64_t offset,
            struct vf_error *err)
{
  (void)rw; (void)buf; (void)count; (void)offset; (void)err;
  return 0;
}

static int
null_zero(struct rw *rw, uint64_t count, uint64_t offset, bool allocate,
          struct vf_error *err)
{
  (void)rw; (void)count; (void)offset; (void)allocate; (void)err;
  return 0;
}

static const struct rw_ops null_ops = {
  .kind = "null",
  .open_again = null_open_again,
  .close = null_close,
  .extents = NULL,          /* never a source */
  .start_read = NULL,
  .start_write = null_complete,
  .start_zero = null_start_zero,
  .poll_fd = null_poll_fd,
  .notify = null_notify,
  .flush = null_flush,
  .pread = NULL,
  .pwrite = null_pwrite,
  .zero = null_zero,
};
