/* vmferry copy engine: the public C API.
 *
 * Everything here returns errors through a struct vf_error; nothing in the
 * engine exits or prints.  The Cython binding (src/vmferry/_engine.pxd)
 * mirrors this header line for line, so change both together.
 */
#ifndef VMFERRY_H
#define VMFERRY_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* What kind of failure, so the binding can raise the right exception. */
enum vf_error_kind {
  VF_ERR_NONE = 0,
  VF_ERR_USAGE,      /* the request itself is wrong: malformed URI, bad options */
  VF_ERR_CONNECT,    /* could not reach, open or create an endpoint */
  VF_ERR_ENDPOINT,   /* an endpoint cannot serve this copy: too small,
                        read-only, or without the requested bitmap */
  VF_ERR_IO,         /* a read, write, zero or flush failed during the copy */
  VF_ERR_CANCELLED,  /* vf_copy_cancel() was called */
};

struct vf_error {
  int kind;          /* enum vf_error_kind */
  int errnum;        /* errno of the cause, 0 if none */
  char msg[512];
};

/* Defaults, chosen from nbdcopy's published measurements (see README). */
#define VF_DEFAULT_CONNECTIONS   4
#define VF_DEFAULT_REQUESTS      64
#define VF_DEFAULT_REQUEST_SIZE  (256 * 1024)
/* Data buffers of all connections together never exceed this, which is
 * what keeps peak RSS flat whatever the disk size. */
#define VF_DEFAULT_BUFFER_BYTES  (16 * 1024 * 1024)
/* Zero-copy lanes, chosen by bench/bench_zc_sizes.py (bench/results/
 * zc_sizes.md: 1 GiB into qemu-nbd, each server first sent the one large
 * read a default copy sends (nbd_ops.c), medians of 5 interleaved rounds on
 * the 2-core machine; wall s, client CPU s/GiB, both servers' CPU s/GiB;
 * xN: requests in flight, cN: connections):
 *   qemu-nbd, Unix  256K x16 c1: 0.44 0.18 0.54   512K x16 c1: 0.47 0.18 0.60
 *                   512K x16 c2: 0.43 0.17 0.58   1M x16 c1:   0.51 0.17 0.66
 *                   2M x16 c1:   0.62 0.19 0.75   2M x8 c1:    0.51 0.19 0.61
 *   file, Unix      512K x16 c1: 0.28 0.15 0.27   1M x16 c1:   0.27 0.15 0.25
 *                   2M x16 c1:   0.29 0.14 0.28   4M x16 c1:   0.60 0.15 0.60
 *   file, TCP       512K x16 c1: 0.54 0.31 0.34   1M x16 c1:   0.65 0.32 0.37
 *                   2M x16 c1:   0.75 0.44 0.44   1M x16 c4:   0.98 0.21 0.53
 * With the servers' buffers kept in their heap, what grows with size is the
 * data in flight: past a few MiB it no longer stays in the cache between the
 * socket read and the file write.  512 KiB is the cheapest or within noise
 * of it everywhere (before that read, a file source did best at 2 MiB, as
 * the destination's cost per request then dominated).  The default
 * connection count on these lanes is in copy.c (half the CPUs). */
#define VF_ZC_REQUEST_SIZE       (512 * 1024)
#define VF_ZC_REQUESTS           16

/* Which lanes carry the data (vf_copy_config.zero_copy). */
enum vf_zero_copy {
  VF_ZERO_COPY_AUTO = 0,     /* zero-copy where both ends allow, else libnbd */
  VF_ZERO_COPY_ON,           /* zero-copy, or fail saying why not */
  VF_ZERO_COPY_OFF,          /* libnbd lanes, with zero detection */
};

struct vf_copy_config {
  const char *src;            /* URI or path */
  const char *dst;            /* URI, path or "null:" */
  unsigned connections;       /* 0: 4 if both sides allow multi-conn, else 1 */
  unsigned threads;           /* 0: half the CPUs between two NBD servers, else all */
  unsigned requests;          /* in flight per connection; 0: default */
  uint32_t request_size;      /* bytes; 0: default */
  uint64_t buffer_bytes;      /* cap on data buffers; 0: default */
  const char *bitmap;         /* copy only extents dirty in this bitmap */
  const char *extents_from;   /* NBD URI whose block status (with bitmap)
                                 decides what to copy while the data is read
                                 from src; NULL: src itself.  Lets a copy read
                                 a raw image directly while the QEMU that has
                                 it open supplies the dirty bitmap. */
  int allocated;              /* write zeroes as allocated blocks */
  int destination_is_zero;    /* skip zero extents entirely */
  int flush;                  /* flush the destination at the end */
  int no_zero_detect;         /* don't scan read data for zeroes */
  int force_multi_conn;       /* several connections even without multi-conn:
                                 for callers that know one server process
                                 (e.g. one QEMU) serves them all */
  uint64_t rate;              /* bytes per second for all connections
                                 together; 0: unlimited.  Data counts as it
                                 is read (zero blocks found in it too), zero
                                 extents only where the destination cannot
                                 zero and gets written zeroes; skipped
                                 extents and block status are free. */
  uint64_t range_start;       /* copy only [range_start, range_end) of the */
  uint64_t range_end;         /* source; range_end 0: to its end */
  int zero_copy;              /* enum vf_zero_copy.  Zero-copy lanes plan
                                 from extents only: the bytes never pass
                                 through this process to be scanned. */
  int no_warm;                /* no first large read of each server (see
                                 nbd_ops.c): for servers an earlier copy
                                 already sent one, and where its time counts
                                 (a migration's paused final pass) */
};

/* Live counters; readable at any time from another thread. */
struct vf_counters {
  uint64_t total;             /* bytes the copy covers (source size) */
  uint64_t read;              /* bytes read from the source */
  uint64_t written;           /* bytes written as data */
  uint64_t zeroed;            /* bytes written as zero requests */
  uint64_t skipped;           /* bytes left untouched (clean or zero) */
  uint64_t done_below;        /* every byte of [range_start, done_below) is
                                 copied (written, zeroed or rightly skipped):
                                 what a copy that stopped early leaves valid,
                                 for a later one to resume from */
};

struct vf_copy;

/* Connects every endpoint and checks sizes; nothing is written yet. */
struct vf_copy *vf_copy_open(const struct vf_copy_config *cfg, struct vf_error *err);
/* Runs the copy to the end; blocks.  0 on success, -1 with *err set. */
int vf_copy_run(struct vf_copy *c, struct vf_error *err);
/* Asks a running copy to stop: in-flight requests drain, run returns -1
 * with VF_ERR_CANCELLED.  Safe from any thread and from signal handlers. */
void vf_copy_cancel(struct vf_copy *c);
void vf_copy_counters(struct vf_copy *c, struct vf_counters *out);
unsigned vf_copy_connections(const struct vf_copy *c);
/* 1 when the data moves on zero-copy lanes, 0 on libnbd lanes. */
int vf_copy_zero_copy(const struct vf_copy *c);
/* Why zero-copy lanes were not used ("" when they were, or were not asked). */
const char *vf_copy_zero_copy_note(const struct vf_copy *c);
/* Frees c.  Never while vf_copy_run(c) runs: its threads use c to the end
 * (cancel, and close after run returns; the binding's Copier enforces it). */
void vf_copy_close(struct vf_copy *c);

/* One endpoint for synchronous I/O into and out of caller-owned buffers. */
struct vf_endpoint;

struct vf_endpoint *vf_endpoint_open(const char *uri, int writable, struct vf_error *err);
int64_t vf_endpoint_size(struct vf_endpoint *ep);
int vf_endpoint_pread(struct vf_endpoint *ep, void *buf, size_t count, uint64_t offset,
                      struct vf_error *err);
int vf_endpoint_pwrite(struct vf_endpoint *ep, const void *buf, size_t count,
                       uint64_t offset, struct vf_error *err);
int vf_endpoint_zero(struct vf_endpoint *ep, uint64_t count, uint64_t offset,
                     struct vf_error *err);
int vf_endpoint_flush(struct vf_endpoint *ep, struct vf_error *err);
/* The one large read a copy sends a server first (ext/nbd_ops.c says why),
 * for a caller whose copy another program makes (QEMU's mirror); best
 * effort, so it returns nothing.  Nothing for files. */
void vf_endpoint_warm(struct vf_endpoint *ep);
void vf_endpoint_close(struct vf_endpoint *ep);

/* The version of the libnbd this engine runs with ("1.14.2"), or "unknown". */
const char *vf_libnbd_version(void);

/* The --tunnelled relay over TLS (tunnel.c): byte streams between Unix
 * sockets on each host and TLS connections to the agent's one port, so
 * QEMU's disk and memory streams cross the network on that port alone and
 * never pass through Python.  One thread runs vf_relay_run(); the other
 * calls may come from any thread meanwhile.
 *
 * A client relay (the source host) listens on Unix sockets; each
 * connection accepted there becomes a TLS connection (client certificate)
 * to the agent, whose first bytes are VF_RELAY_PREFACE in the clear, then,
 * inside TLS, a header naming the route's token.  A server relay (in the
 * agent) is handed such connections with the preface already read, does
 * the TLS handshake (a client certificate signed by the CA is required),
 * reads the header, and connects to the Unix socket routed to that token,
 * or closes the connection. */
#define VF_RELAY_PREFACE      "VMFRELAY"      /* 8 bytes, never a TLS record */
#define VF_RELAY_PREFACE_LEN  8
#define VF_RELAY_TOKEN_LEN    64              /* hex digits */

enum vf_relay_role { VF_RELAY_CLIENT = 0, VF_RELAY_SERVER = 1 };

struct vf_relay_config {
  int role;                   /* enum vf_relay_role */
  const char *ca_file;        /* PEM: the CA the peer's certificate must chain to */
  const char *cert_file;      /* PEM: this side's certificate */
  const char *key_file;       /* PEM: its key */
  const char *address;        /* client: the agent's numeric IP address */
  unsigned port;              /* client: its TLS port */
  const char *server_name;    /* client: the name (or IP) the agent's
                                 certificate must carry */
  unsigned handshake_ms;      /* a connection not relaying by then is closed
                                 (connect, TLS handshake, header); 0: 5000 */
  unsigned pending_cap;       /* server: connections held before they relay;
                                 a newcomer evicts the oldest; 0: 64 */
};

struct vf_relay_stats {
  uint64_t bytes_up;          /* Unix side -> TLS side (payload) */
  uint64_t bytes_down;        /* TLS side -> Unix side */
  uint64_t connections;       /* that reached relaying */
  uint64_t refused;           /* closed before relaying (handshake, header,
                                 token, deadline, eviction, connect) */
  uint64_t failed;            /* closed by an error while relaying */
  uint64_t cpu_ns;            /* the relay thread's CPU time */
  unsigned active;            /* connections open now */
  char last_error[256];       /* why the last connection was refused or failed */
};

struct vf_relay;

struct vf_relay *vf_relay_new(const struct vf_relay_config *cfg, struct vf_error *err);
/* Client: a Unix socket at PATH (created here, mode 0600) whose connections
 * are carried to the agent's route TOKEN. */
int vf_relay_listen(struct vf_relay *r, const char *path, const char *token,
                    struct vf_error *err);
/* Server: connections presenting TOKEN go to the Unix socket PATH. */
int vf_relay_route(struct vf_relay *r, const char *token, const char *path,
                   struct vf_error *err);
/* Server: new connections with TOKEN are refused (open ones go on). */
void vf_relay_unroute(struct vf_relay *r, const char *token);
/* Server: takes FD (a TCP connection whose preface was read) in all cases;
 * it must finish its handshake and header within TIMEOUT_MS. */
int vf_relay_adopt(struct vf_relay *r, int fd, unsigned timeout_ms, struct vf_error *err);
/* Relays until vf_relay_stop(); 0, or -1 with *err set (never exits). */
int vf_relay_run(struct vf_relay *r, struct vf_error *err);
void vf_relay_stop(struct vf_relay *r);
void vf_relay_get_stats(struct vf_relay *r, struct vf_relay_stats *out);
/* Closes every connection and socket.  Never while vf_relay_run(r) runs. */
void vf_relay_free(struct vf_relay *r);

#ifdef __cplusplus
}
#endif
#endif /* VMFERRY_H */
