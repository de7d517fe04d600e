/* Internals shared by the engine's C files; not part of the public API.
 *
 * An endpoint kind (nbd, file, null) is one struct rw_ops table in one file.
 * Each connection is a struct rw, embedded as the first member of the kind's
 * private struct.  Endpoints without asynchronous I/O complete a command
 * before start_* returns, so the copy loop never needs to know which is which.
 */
#ifndef VMFERRY_INTERNAL_H
#define VMFERRY_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>
#include <stddef.h>

#include "vmferry.h"

struct rw;
struct command;

enum extent_type { EXT_DATA, EXT_ZERO, EXT_SKIP };

struct extent {
  uint64_t offset;
  uint64_t length;
  enum extent_type type;
};

struct extent_list {
  struct extent *v;
  size_t len, cap;
};

int extent_append(struct extent_list *l, uint64_t offset, uint64_t length,
                  enum extent_type type);

enum command_type { CMD_READ, CMD_WRITE, CMD_ZERO, CMD_FLUSH };

/* Where a write's bytes are.  Zero-copy kinds (rw.zero_copy) also take them
 * from a file or a pipe, so they never pass through this process. */
enum payload { PAYLOAD_MEMORY = 0, PAYLOAD_FILE, PAYLOAD_PIPE };

struct zc_pipe;

/* One request in flight.  data points into a shared buffer (or is NULL for
 * zero requests); done is called exactly once with 0 or an errno.
 *
 * Zero-copy reads (data NULL) put their payload into the file fd at offset
 * and are done when it is there; or, with fd -1, are done as soon as it
 * starts to arrive in *pipe, and the caller must then at once queue the
 * write that takes exactly length bytes from that pipe. */
struct command {
  enum command_type type;
  uint64_t offset;
  uint64_t length;
  char *data;
  struct buffer *buf;
  struct lane *lane;
  void (*done)(struct command *cmd, int err);
  struct command *next_free;
  enum payload payload;
  int fd;                     /* PAYLOAD_FILE source, or a zero-copy read's file */
  struct zc_pipe *pipe;       /* PAYLOAD_PIPE source */
  bool allocate;              /* CMD_ZERO: leave no hole */
  bool sink_failed;           /* a zero-copy read failed writing into its file */
  /* The endpoint kind's own bookkeeping while the command is queued. */
  uint64_t cookie;
  struct command *next_queued;
};

struct rw_ops {
  const char *kind;           /* for messages only: ask the flags below */
  /* Another process does this end's I/O; this one only talks to it, so
   * the copy leaves CPUs to the servers. */
  bool served;
  /* As a source, its extents are fetched for the whole copy before the
   * first byte moves rather than per work range (copy.c says why). */
  bool plan_up_front;
  /* Another connection to the same endpoint, for multi-conn copies. */
  struct rw *(*open_again)(struct rw *rw, struct vf_error *err);
  void (*close)(struct rw *rw);

  /* Appends extents covering at least [offset, offset+1) and at most
   * [offset, offset+count); the caller asks again for the rest. */
  int (*extents)(struct rw *rw, uint64_t offset, uint64_t count,
                 struct extent_list *out, struct vf_error *err);

  /* Start a request; cmd->done runs later from notify(), or before return
   * for synchronous kinds.  -1 means it was not started (err set). */
  int (*start_read)(struct rw *rw, struct command *cmd, struct vf_error *err);
  int (*start_write)(struct rw *rw, struct command *cmd, struct vf_error *err);
  int (*start_zero)(struct rw *rw, struct command *cmd, bool allocate,
                    struct vf_error *err);

  /* For the poll loop: the fd and events to wait for, or -1 when this
   * connection has nothing to wait for. */
  int (*poll_fd)(struct rw *rw, short *events);
  int (*notify)(struct rw *rw, short revents, struct vf_error *err);

  int (*flush)(struct rw *rw, struct vf_error *err);

  /* Once per copy and endpoint, before the first data command: readies a
   * server for the requests to come (nbd_ops.c says why).  NULL: nothing. */
  void (*warm)(struct rw *rw);

  /* Synchronous I/O for vf_endpoint_* callers. */
  int (*pread)(struct rw *rw, void *buf, size_t count, uint64_t offset,
               struct vf_error *err);
  int (*pwrite)(struct rw *rw, const void *buf, size_t count, uint64_t offset,
                struct vf_error *err);
  int (*zero)(struct rw *rw, uint64_t count, uint64_t offset, bool allocate,
              struct vf_error *err);
};

struct rw {
  const struct rw_ops *ops;
  const char *name;          /* what the user typed, for messages */
  int64_t size;
  bool multi_conn;           /* safe to open several connections */
  bool can_zero;             /* start_zero works; else write zero buffers */
  uint32_t max_request;      /* largest data request the server takes; 0: any */
  int splice_fd;             /* a file the kernel reads or writes at any offset
                                (sendfile, splice, copy_file_range); -1: none */
  bool zero_copy;            /* start_read/start_write take the payloads above */
};

/* endpoint.c: what a URI names, from its text alone, so a copy can choose
 * its lanes before anything connects; rw_open opens that kind. */
enum uri_kind {
  URI_EMPTY,
  URI_NBD,            /* TLS or vsock: only libnbd speaks these */
  URI_NBD_PLAIN,      /* nbd:// or nbd+unix://: zero-copy lanes speak these too */
  URI_NULL,
  URI_FILE,
  URI_UNSUPPORTED,
};
enum uri_kind uri_kind(const char *uri);
int nbd_uri_check(const char *uri, struct vf_error *err);
/* bitmap may be NULL. */
struct rw *rw_open(const char *uri, bool writable, const char *bitmap,
                   struct vf_error *err);
int endpoint_create(const char *uri, uint64_t size, bool *created,
                    struct vf_error *err);

struct rw *nbd_rw_open(const char *uri, bool writable, const char *bitmap,
                       struct vf_error *err);
struct rw *file_rw_open(const char *path, bool writable, struct vf_error *err);
struct rw *null_rw_open(struct vf_error *err);
/* Plain NBD driven on its socket for zero-copy lanes; a VF_ERR_ENDPOINT
 * error says why this server cannot have one. */
struct rw *raw_rw_open(const char *uri, bool writable, const char *bitmap,
                       struct vf_error *err);

/* nbd_ops.c, shared with nbd_raw.c */
struct nbd_handle;
/* What both NBD kinds keep of a connection: enough to open another like it
 * and to read its extents. */
struct nbd_names {
  char *uri;
  char *bitmap;               /* NULL unless copying dirty extents only */
  char *context;              /* meta context extents are read from, or NULL */
};
int nbd_error(struct vf_error *err, int kind, const char *what, const char *name);
struct nbd_handle *nbd_connect_checked(const char *uri, bool writable,
                                       const char *bitmap, bool structured,
                                       struct nbd_names *names,
                                       struct vf_error *err);
void nbd_names_free(struct nbd_names *names);
void nbd_describe(struct nbd_handle *h, struct rw *rw);
uint64_t nbd_warm_length(struct nbd_handle *h, const struct rw *rw, bool source);
uint64_t nbd_warm_offset(struct nbd_handle *h, const struct nbd_names *names,
                         const struct rw *rw, uint64_t n, bool source);
void nbd_warm_server(struct nbd_handle *h, const struct nbd_names *names,
                     const struct rw *rw, bool source);
int nbd_handle_extents(struct nbd_handle *h, const struct nbd_names *names,
                       uint64_t offset, uint64_t count,
                       struct extent_list *out, struct vf_error *err);

/* error.c */
int vf_set_error(struct vf_error *err, int kind, int errnum, const char *fmt, ...)
  __attribute__((format(printf, 4, 5)));

/* Size of the all-zero region shared by writers that cannot zero. */
#define ZERO_BUFFER_SIZE (1024 * 1024)
extern const char vf_zero_buffer[ZERO_BUFFER_SIZE];

bool is_zero(const char *p, size_t len);

#endif /* VMFERRY_INTERNAL_H */
