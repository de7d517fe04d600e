/* Local files and block devices.  I/O is synchronous: a command completes
 * before start_* returns, which the copy loop treats like any other
 * completion.  Holes are found with SEEK_DATA/SEEK_HOLE. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

struct file_rw {
  struct rw rw;               /* must be first */
  int fd;
  char *path;
  bool writable;
  bool is_block;
  bool can_punch;             /* cleared the first time the kernel says no */
  bool can_zero_range;
};

static const struct rw_ops file_ops;

static int
file_error(struct vf_error *err, int errnum, const char *what, const char *path)
{
  return vf_set_error(err, VF_ERR_IO, errnum, "%s %s: %s", what, path,
                      strerror(errnum));
}

struct rw *
file_rw_open(const char *path, bool writable, struct vf_error *err)
{
  struct file_rw *f = calloc(1, sizeof *f);
  struct stat st;

  if (f == NULL) {
    vf_set_error(err, VF_ERR_IO, ENOMEM, "out of memory");
    return NULL;
  }
  f->fd = open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
  if (f->fd == -1) {
    int e = errno;
    vf_set_error(err, VF_ERR_CONNECT, e, "cannot open %s: %s", path, strerror(e));
    free(f);
    return NULL;
  }
  if (fstat(f->fd, &st) == -1) {
    file_error(err, errno, "cannot stat", path);
    goto fail;
  }
  f->is_block = S_ISBLK(st.st_mode);
  if (f->is_block) {
    uint64_t size;
    if (ioctl(f->fd, BLKGETSIZE64, &size) == -1) {
      file_error(err, errno, "cannot get the size of", path);
      goto fail;
    }
    f->rw.size = (int64_t)size;
  } else if (S_ISREG(st.st_mode)) {
    f->rw.size = st.st_size;
  } else {
    vf_set_error(err, VF_ERR_ENDPOINT, EINVAL,
                 "%s is neither a regular file nor a block device", path);
    goto fail;
  }
  f->path = strdup(path);
  if (f->path == NULL) {
    vf_set_error(err, VF_ERR_IO, ENOMEM, "out of memory");
    goto fail;
  }
  f->rw.ops = &file_ops;
  f->rw.name = f->path;
  f->rw.multi_conn = true;
  f->rw.can_zero = true;
  f->rw.splice_fd = f->fd;
  f->rw.zero_copy = true;
  f->writable = writable;
  f->can_punch = f->can_zero_range = !f->is_block;
  return &f->rw;

fail:
  close(f->fd);
  free(f);
  return NULL;
}

static struct rw *
file_open_again(struct rw *rw, struct vf_error *err)
{
  struct file_rw *f = (struct file_rw *)rw;
  return file_rw_open(f->path, f->writable, err);
}

static void
file_close(struct rw *rw)
{
  struct file_rw *f = (struct file_rw *)rw;
  close(f->fd);
  free(f->path);
  free(f);
}

static int
file_extents(struct rw *rw, uint64_t offset, uint64_t count,
             struct extent_list *out, struct vf_error *err)
{
  struct file_rw *f = (struct file_rw *)rw;
  uint64_t end = offset + count;
  off_t data, hole;

  if (f->is_block)
    return extent_append(out, offset, count, EXT_DATA);
  data = lseek(f->fd, offset, SEEK_DATA);
  if (data == -1 && errno == ENXIO)    /* only a hole from here to EOF */
    return extent_append(out, offset, count, EXT_ZERO);
  if (data == -1)   /* no SEEK_DATA here: all data, never wrong */
    return extent_append(out, offset, count, EXT_DATA);
  if ((uint64_t)data > offset)
    return extent_append(out, offset,
                         ((uint64_t)data < end ? (uint64_t)data : end) - offset,
                         EXT_ZERO);
  hole = lseek(f->fd, offset, SEEK_HOLE);
  if (hole == -1)
    return extent_append(out, offset, count, EXT_DATA);
  (void)err;
  return extent_append(out, offset,
                       ((uint64_t)hole < end ? (uint64_t)hole : end) - offset,
                       EXT_DATA);
}

static int
full_pread(struct file_rw *f, void *buf, size_t count, uint64_t offset,
           struct vf_error *err)
{
  char *p = buf;
  while (count > 0) {
    ssize_t r = pread(f->fd, p, count, offset);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return file_error(err, errno, "cannot read from", f->path);
    }
    if (r == 0)
      return vf_set_error(err, VF_ERR_IO, EIO, "cannot read from %s: "
                          "unexpected end of file at %llu", f->path,
                          (unsigned long long)offset);
    p += r;
    count -= r;
    offset += r;
  }
  return 0;
}

static int
full_pwrite(struct file_rw *f, const void *buf, size_t count, uint64_t offset,
            struct vf_error *err)
{
  const char *p = buf;
  while (count > 0) {
    ssize_t r = pwrite(f->fd, p, count, offset);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return file_error(err, errno, "cannot write to", f->path);
    }
    p += r;
    count -= r;
    offset += r;
  }
  return 0;
}

static int
write_zeroes(struct file_rw *f, uint64_t count, uint64_t offset,
             struct vf_error *err)
{
  while (count > 0) {
    size_t n = count < ZERO_BUFFER_SIZE ? count : ZERO_BUFFER_SIZE;
    if (full_pwrite(f, vf_zero_buffer, n, offset, err) == -1)
      return -1;
    count -= n;
    offset += n;
  }
  return 0;
}

static int
file_zero(struct rw *rw, uint64_t count, uint64_t offset, bool allocate,
          struct vf_error *err)
{
  struct file_rw *f = (struct file_rw *)rw;

  if (f->is_block) {
    uint64_t range[2] = { offset, count };
    if (ioctl(f->fd, BLKZEROOUT, range) == 0)
      return 0;
    return write_zeroes(f, count, offset, err);
  }
  if (allocate && f->can_zero_range) {
    if (fallocate(f->fd, FALLOC_FL_ZERO_RANGE, offset, count) == 0)
      return 0;
    f->can_zero_range = false;
  }
  if (f->can_punch) {
    if (fallocate(f->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  offset, count) == 0) {
      /* tmpfs cannot ZERO_RANGE, but punch then allocate gives the same
       * allocated zeroes. */
      if (!allocate || fallocate(f->fd, 0, offset, count) == 0)
        return 0;
    } else
      f->can_punch = false;
  }
  return write_zeroes(f, count, offset, err);
}

static int
file_sync_pread(struct rw *rw, void *buf, size_t count, uint64_t offset,
                struct vf_error *err)
{
  return full_pread((struct file_rw *)rw, buf, count, offset, err);
}

static int
file_sync_pwrite(struct rw *rw, const void *buf, size_t count, uint64_t offset,
                 struct vf_error *err)
{
  return full_pwrite((struct file_rw *)rw, buf, count, offset, err);
}

static int
file_start_read(struct rw *rw, struct command *cmd, struct vf_error *err)
{
  struct vf_error e = { 0 };
  int r = file_sync_pread(rw, cmd->data, cmd->length, cmd->offset, &e);
  (void)err;
  cmd->done(cmd, r == 0 ? 0 : e.errnum);
  return 0;
}

/* File to file inside the kernel: copy_file_range (which may share blocks
 * on filesystems that can), else sendfile, which any regular file takes. */
static int
copy_from_file(struct file_rw *f, int src, uint64_t count, uint64_t offset,
               struct vf_error *err)
{
  bool range = true;
  while (count > 0) {
    loff_t in = (loff_t)offset, out = (loff_t)offset;
    ssize_t r;
    if (range) {
      r = copy_file_range(src, &in, f->fd, &out, count, 0);
      if (r == -1 && (errno == EXDEV || errno == EINVAL || errno == ENOSYS ||
                      errno == EOPNOTSUPP)) {
        range = false;
        continue;
      }
    } else {
      if (lseek(f->fd, (off_t)offset, SEEK_SET) == -1)
        return file_error(err, errno, "cannot seek in", f->path);
      r = sendfile(f->fd, src, &in, count);
    }
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return file_error(err, errno, "cannot copy into", f->path);
    }
    if (r == 0)
      return vf_set_error(err, VF_ERR_IO, EIO, "cannot copy into %s: the source "
                          "ended at %llu", f->path, (unsigned long long)offset);
    count -= r;
    offset += r;
  }
  return 0;
}

static int
file_start_write(struct rw *rw, struct command *cmd, struct vf_error *err)
{
  struct vf_error e = { 0 };
  int r = cmd->payload == PAYLOAD_FILE
          ? copy_from_file((struct file_rw *)rw, cmd->fd, cmd->length, cmd->offset, &e)
          : file_sync_pwrite(rw, cmd->data, cmd->length, cmd->offset, &e);
  (void)err;
  cmd->done(cmd, r == 0 ? 0 : e.errnum);
  return 0;
}

static int
file_start_zero(struct rw *rw, struct command *cmd, bool allocate,
                struct vf_error *err)
{
  struct vf_error e = { 0 };
  int r = file_zero(rw, cmd->length, cmd->offset, allocate, &e);
  (void)err;
  cmd->done(cmd, r == 0 ? 0 : e.errnum);
  return 0;
}

static int
file_poll_fd(struct rw *rw, short *events)
{
  (void)rw;
  *events = 0;
  return -1;
}

static int
file_notify(struct rw *rw, short revents, struct vf_error *err)
{
  (void)rw; (void)revents; (void)err;
  return 0;
}

static int
file_flush(struct rw *rw, struct vf_error *err)
{
  struct file_rw *f = (struct file_rw *)rw;
  if (fdatasync(f->fd) == -1)
    return file_error(err, errno, "cannot flush", f->path);
  return 0;
}

static const struct rw_ops file_ops = {
  .kind = "file",
  .plan_up_front = true,
  .open_again = file_open_again,
  .close = file_close,
  .extents = file_extents,
  .start_read = file_start_read,
  .start_write = file_start_write,
  .start_zero = file_start_zero,
  .poll_fd = file_poll_fd,
  .notify = file_notify,
  .flush = file_flush,
  .pread = file_sync_pread,
  .pwrite = file_sync_pwrite,
  .zero = file_zero,
};
