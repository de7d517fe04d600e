/* The --tunnelled relay over TLS: QEMU's disk (NBD) and memory streams
 * between Unix sockets on the two hosts, carried by TLS connections to the
 * agent's one port (vmferry.h describes the roles).
 *
 * Why here and not in Python: the payload never enters the interpreter,
 * and one thread, without the GIL, moves every stream of a migration.  Why
 * GnuTLS in user space: kernel TLS is not available everywhere (and not on
 * the machine this was written on), and Python's ssl cannot hand a session
 * it negotiated to C, so the agent's side does the whole handshake here.
 *
 * One poll loop, every socket non-blocking; each connection is a small
 * state machine (connect, handshake, header, relay) with one reused buffer
 * per direction.  A direction stops reading while its buffer waits to be
 * written, so a slow reader holds back its writer (never a queue that
 * grows).  Nothing here exits or prints: a connection's failure closes that
 * connection and is kept as last_error; only a failure of the loop itself
 * returns an error.
 *
 * What a GiB costs (bench/relay_cpu.py measures it): the AEAD cipher and
 * the kernel's copies and TCP, not the number of calls.  So the cipher is
 * the fastest one GnuTLS has on this CPU (PRIORITIES), each direction moves
 * whole buffers (all the records of what was read go out back to back; the
 * records that arrived are all decrypted into the buffer before it is
 * written, one send and one wakeup of QEMU per buffer rather than per
 * record), and a socket that said EAGAIN is not asked again until the next
 * poll.  Measured and left out, for no gain on top of those: corking
 * (gnutls_record_uncork still sends record by record), a write-behind or
 * read-ahead buffer of ciphertext (a syscall saved costs a copy), MSG_MORE,
 * and buffers larger than 64 KiB.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <gnutls/gnutls.h>

#include "internal.h"

/* 64 KiB per direction: four TLS records per read of the Unix side, and
 * few enough bytes per connection that a migration's handful of streams
 * costs well under a MiB. */
#define BUF_SIZE (64 * 1024)
/* Rounds of work on one connection (each moves up to a buffer each way)
 * before the loop looks at the others, so one busy stream cannot starve
 * the rest. */
#define ROUNDS 16
#define HEADER_MAGIC "VMFTUN1 "
#define HEADER_MAGIC_LEN 8
#define HEADER_LEN (HEADER_MAGIC_LEN + VF_RELAY_TOKEN_LEN)
/* TLS 1.3 and 1.2 only.  PERFORMANCE is NORMAL's algorithms (the same
 * ciphers, signatures, groups and MACs) with the ciphers sorted fastest
 * first by GnuTLS's own CPU detection: AES-128-GCM where it has AES
 * instructions (a tenth cheaper than NORMAL's first, AES-256-GCM),
 * CHACHA20-POLY1305 where it has not; but for TLS 1.2 it puts the RSA key
 * exchange, without forward secrecy, first, hence -RSA (NORMAL offered it
 * third; both ends are this relay, with (EC)DHE). */
#define PRIORITIES "PERFORMANCE:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2:-RSA"

enum state { S_CONNECT, S_HANDSHAKE, S_HEADER, S_RELAY };

struct conn {
  struct conn *next;
  enum state state;
  int net;                    /* the TCP connection that carries TLS */
  int local;                  /* the Unix side; -1 until a server knows the route */
  gnutls_session_t tls;
  bool has_tls;
  int64_t born, deadline;     /* ns; the deadline holds until relaying */
  /* up: Unix -> TLS */
  char *up;
  size_t up_len, up_off;
  bool up_eof, up_done;
  /* down: TLS -> Unix */
  char *down;
  size_t down_len, down_off;
  bool down_eof, down_done;
  bool busy;                  /* stopped after ROUNDS with work left */
  bool dead;
  int net_idx, local_idx;     /* in this turn's pollfd array, or -1 */
};

struct listener {
  struct listener *next;
  int fd;
  char token[VF_RELAY_TOKEN_LEN + 1];
  char path[sizeof ((struct sockaddr_un *) 0)->sun_path];
};

struct route {
  struct route *next;
  char token[VF_RELAY_TOKEN_LEN + 1];
  char path[sizeof ((struct sockaddr_un *) 0)->sun_path];
};

struct adopted {
  struct adopted *next;
  int fd;
  int64_t deadline;
};

struct vf_relay {
  int role;
  gnutls_certificate_credentials_t cred;
  gnutls_priority_t prio;
  struct sockaddr_storage addr;
  socklen_t addrlen;
  char server_name[256];
  bool name_is_ip;
  int64_t handshake_ns;
  unsigned pending_cap;
  int wake;                   /* eventfd: stop, new listener or adopted fd */

  pthread_mutex_t lock;       /* guards everything below but conns, pending */
  struct listener *listeners;
  struct route *routes;
  struct adopted *adopted;
  bool stop;
  struct vf_relay_stats stats;

  struct conn *conns;         /* the loop's own */
  unsigned pending;           /* of those, not relaying yet */
};

static int64_t
now_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void
wake(struct vf_relay *r)
{
  uint64_t one = 1;
  ssize_t n = write(r->wake, &one, sizeof one);
  (void) n;                   /* a full counter wakes the loop all the same */
}

static bool
valid_token(const char *t)
{
  size_t i;
  if (t == NULL || strlen(t) != VF_RELAY_TOKEN_LEN)
    return false;
  for (i = 0; i < VF_RELAY_TOKEN_LEN; i++)
    if (!((t[i] >= '0' && t[i] <= '9') || (t[i] >= 'a' && t[i] <= 'f')))
      return false;
  return true;
}

/* Every byte compared whatever differs first: the time a refusal takes says
 * nothing about how much of a guess was right. */
static bool
same_token(const char *a, const char *b)
{
  unsigned char diff = 0;
  size_t i;
  for (i = 0; i < VF_RELAY_TOKEN_LEN; i++)
    diff |= (unsigned char) a[i] ^ (unsigned char) b[i];
  return diff == 0;
}

static int
tls_error(struct vf_error *err, const char *what, int rc)
{
  return vf_set_error(err, VF_ERR_USAGE, 0, "TLS relay: %s: %s", what, gnutls_strerror(rc));
}

struct vf_relay *
vf_relay_new(const struct vf_relay_config *cfg, struct vf_error *err)
{
  struct vf_relay *r;
  int rc;

  if (cfg->role != VF_RELAY_CLIENT && cfg->role != VF_RELAY_SERVER) {
    vf_set_error(err, VF_ERR_USAGE, 0, "TLS relay: unknown role %d", cfg->role);
    return NULL;
  }
  if (!cfg->ca_file || !cfg->cert_file || !cfg->key_file) {
    vf_set_error(err, VF_ERR_USAGE, 0, "TLS relay: a CA, a certificate and a key are needed");
    return NULL;
  }
  r = calloc(1, sizeof *r);
  if (r == NULL) {
    vf_set_error(err, VF_ERR_IO, errno, "TLS relay: out of memory");
    return NULL;
  }
  r->role = cfg->role;
  r->wake = -1;
  r->handshake_ns = (int64_t) (cfg->handshake_ms ? cfg->handshake_ms : 5000) * 1000000;
  r->pending_cap = cfg->pending_cap ? cfg->pending_cap : 64;
  pthread_mutex_init(&r->lock, NULL);

  if (r->role == VF_RELAY_CLIENT) {
    struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICHOST };
    struct addrinfo *ai = NULL;
    char port[16];

    if (!cfg->address || !cfg->server_name || !cfg->port || cfg->port > 65535
        || strlen(cfg->server_name) >= sizeof r->server_name) {
      vf_set_error(err, VF_ERR_USAGE, 0,
                    "TLS relay: a client needs the agent's address, port and name");
      goto fail;
    }
    snprintf(port, sizeof port, "%u", cfg->port);
    rc = getaddrinfo(cfg->address, port, &hints, &ai);
    if (rc != 0 || ai == NULL) {
      vf_set_error(err, VF_ERR_USAGE, 0, "TLS relay: %s is not an IP address: %s",
                    cfg->address, gai_strerror(rc));
      goto fail;
    }
    memcpy(&r->addr, ai->ai_addr, ai->ai_addrlen);
    r->addrlen = ai->ai_addrlen;
    freeaddrinfo(ai);
    strcpy(r->server_name, cfg->server_name);
    {
      /* SNI carries DNS names only (RFC 6066); an IP is checked all the same */
      struct addrinfo *n = NULL;
      r->name_is_ip = getaddrinfo(cfg->server_name, NULL, &hints, &n) == 0;
      if (n)
        freeaddrinfo(n);
    }
  }

  rc = gnutls_certificate_allocate_credentials(&r->cred);
  if (rc < 0) {
    tls_error(err, "credentials", rc);
    r->cred = NULL;
    goto fail;
  }
  rc = gnutls_certificate_set_x509_trust_file(r->cred, cfg->ca_file, GNUTLS_X509_FMT_PEM);
  if (rc <= 0) {
    vf_set_error(err, VF_ERR_USAGE, 0, "TLS relay: no CA certificate in %s%s%s",
                  cfg->ca_file, rc < 0 ? ": " : "", rc < 0 ? gnutls_strerror(rc) : "");
    goto fail;
  }
  rc = gnutls_certificate_set_x509_key_file(r->cred, cfg->cert_file, cfg->key_file,
                                             GNUTLS_X509_FMT_PEM);
  if (rc < 0) {
    vf_set_error(err, VF_ERR_USAGE, 0, "TLS relay: %s with %s: %s", cfg->cert_file,
                  cfg->key_file, gnutls_strerror(rc));
    goto fail;
  }
  rc = gnutls_priority_init(&r->prio, PRIORITIES, NULL);
  if (rc < 0) {
    tls_error(err, "priorities", rc);
    r->prio = NULL;
    goto fail;
  }
  r->wake = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (r->wake < 0) {
    vf_set_error(err, VF_ERR_IO, errno, "TLS relay: eventfd: %s", strerror(errno));
    goto fail;
  }
  return r;

fail:
  vf_relay_free(r);
  return NULL;
}

int
vf_relay_listen(struct vf_relay *r, const char *path, const char *token, struct vf_error *err)
{
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  struct listener *l;
  int fd;

  if (r->role != VF_RELAY_CLIENT)
    return vf_set_error(err, VF_ERR_USAGE, 0, "TLS relay: only a client listens");
  if (!valid_token(token))
    return vf_set_error(err, VF_ERR_USAGE, 0, "TLS relay: a token is %d hex digits",
                         VF_RELAY_TOKEN_LEN);
  if (strlen(path) >= sizeof sa.sun_path)
    return vf_set_error(err, VF_ERR_USAGE, ENAMETOOLONG, "TLS relay: %s: path too long",
                         path);
  strcpy(sa.sun_path, path);
  fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return vf_set_error(err, VF_ERR_IO, errno, "TLS relay: socket: %s", strerror(errno));
  if (bind(fd, (struct sockaddr *) &sa, sizeof sa) < 0 || chmod(path, 0600) < 0
      || listen(fd, 64) < 0) {
    int e = errno;
    close(fd);
    return vf_set_error(err, VF_ERR_IO, e, "TLS relay: cannot listen on %s: %s", path,
                         strerror(e));
  }
  l = calloc(1, sizeof *l);
  if (l == NULL) {
    close(fd);
    unlink(path);
    return vf_set_error(err, VF_ERR_IO, ENOMEM, "TLS relay: out of memory");
  }
  l->fd = fd;
  strcpy(l->token, token);
  strcpy(l->path, path);
  pthread_mutex_lock(&r->lock);
  l->next = r->listeners;
  r->listeners = l;
  pthread_mutex_unlock(&r->lock);
  wake(r);
  return 0;
}

int
vf_relay_route(struct vf_relay *r, const char *token, const char *path, struct vf_error *err)
{
  struct route *rt;

  if (r->role != VF_RELAY_SERVER)
    return vf_set_error(err, VF_ERR_USAGE, 0, "TLS relay: only a server routes");
  if (!valid_token(token))
    return vf_set_error(err, VF_ERR_USAGE, 0, "TLS relay: a token is %d hex digits",
                         VF_RELAY_TOKEN_LEN);
  if (strlen(path) >= sizeof rt->path)
    return vf_set_error(err, VF_ERR_USAGE, ENAMETOOLONG, "TLS relay: %s: path too long",
                         path);
  rt = calloc(1, sizeof *rt);
  if (rt == NULL)
    return vf_set_error(err, VF_ERR_IO, ENOMEM, "TLS relay: out of memory");
  strcpy(rt->token, token);
  strcpy(rt->path, path);
  pthread_mutex_lock(&r->lock);
  rt->next = r->routes;
  r->routes = rt;
  pthread_mutex_unlock(&r->lock);
  return 0;
}

void
vf_relay_unroute(struct vf_relay *r, const char *token)
{
  struct route **p;

  if (!valid_token(token))
    return;
  pthread_mutex_lock(&r->lock);
  for (p = &r->routes; *p;) {
    if (same_token((*p)->token, token)) {
      struct route *gone = *p;
      *p = gone->next;
      free(gone);
    }
    else
      p = &(*p)->next;
  }
  pthread_mutex_unlock(&r->lock);
}

int
vf_relay_adopt(struct vf_relay *r, int fd, unsigned timeout_ms, struct vf_error *err)
{
  struct adopted *a;
  int flags;

  if (r->role != VF_RELAY_SERVER) {
    close(fd);
    return vf_set_error(err, VF_ERR_USAGE, 0, "TLS relay: only a server adopts");
  }
  a = calloc(1, sizeof *a);
  flags = fcntl(fd, F_GETFL);
  if (a == NULL || flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) {
    int e = a ? errno : ENOMEM;
    free(a);
    close(fd);
    return vf_set_error(err, VF_ERR_IO, e, "TLS relay: cannot take a connection: %s",
                         strerror(e));
  }
  a->fd = fd;
  a->deadline = now_ns() + (int64_t) timeout_ms * 1000000;
  pthread_mutex_lock(&r->lock);
  a->next = r->adopted;
  r->adopted = a;
  pthread_mutex_unlock(&r->lock);
  wake(r);
  return 0;
}

void
vf_relay_stop(struct vf_relay *r)
{
  pthread_mutex_lock(&r->lock);
  r->stop = true;
  pthread_mutex_unlock(&r->lock);
  wake(r);
}

void
vf_relay_get_stats(struct vf_relay *r, struct vf_relay_stats *out)
{
  pthread_mutex_lock(&r->lock);
  *out = r->stats;
  pthread_mutex_unlock(&r->lock);
}

/* -- connections ----------------------------------------------------- */

static struct conn *
conn_new(struct vf_relay *r, int net, int local, enum state state, int64_t deadline)
{
  struct conn *c = calloc(1, sizeof *c);
  if (c == NULL)
    return NULL;
  c->up = malloc(BUF_SIZE);
  c->down = malloc(BUF_SIZE);
  if (c->up == NULL || c->down == NULL) {
    free(c->up);
    free(c->down);
    free(c);
    return NULL;
  }
  c->net = net;
  c->local = local;
  c->state = state;
  c->born = now_ns();
  c->deadline = deadline;
  c->next = r->conns;
  r->conns = c;
  r->pending++;
  pthread_mutex_lock(&r->lock);
  r->stats.active++;
  pthread_mutex_unlock(&r->lock);
  return c;
}

/* Closes C; WHY (printf-like) is kept as last_error, and counts C as
 * refused before it relayed, failed after; NULL: it ended as it should. */
static void __attribute__((format(printf, 3, 4)))
conn_end(struct vf_relay *r, struct conn *c, const char *why, ...)
{
  if (c->dead)
    return;
  c->dead = true;
  pthread_mutex_lock(&r->lock);
  r->stats.active--;
  if (why) {
    va_list ap;
    va_start(ap, why);
    vsnprintf(r->stats.last_error, sizeof r->stats.last_error, why, ap);
    va_end(ap);
    if (c->state == S_RELAY)
      r->stats.failed++;
    else
      r->stats.refused++;
  }
  pthread_mutex_unlock(&r->lock);
  if (c->state != S_RELAY)
    r->pending--;
  if (c->has_tls)
    gnutls_deinit(c->tls);
  c->has_tls = false;
  if (c->net >= 0)
    close(c->net);
  if (c->local >= 0)
    close(c->local);
  c->net = c->local = -1;
}

static void
conn_free(struct conn *c)
{
  free(c->up);
  free(c->down);
  free(c);
}

static void
relaying(struct vf_relay *r, struct conn *c)
{
  c->state = S_RELAY;
  r->pending--;
  pthread_mutex_lock(&r->lock);
  r->stats.connections++;
  pthread_mutex_unlock(&r->lock);
}

static int
start_tls(struct vf_relay *r, struct conn *c)
{
  int rc = gnutls_init(&c->tls, (r->role == VF_RELAY_CLIENT ? GNUTLS_CLIENT : GNUTLS_SERVER)
                        | GNUTLS_NONBLOCK | GNUTLS_NO_SIGNAL);
  if (rc < 0)
    return rc;
  c->has_tls = true;
  if ((rc = gnutls_priority_set(c->tls, r->prio)) < 0
      || (rc = gnutls_credentials_set(c->tls, GNUTLS_CRD_CERTIFICATE, r->cred)) < 0)
    return rc;
  if (r->role == VF_RELAY_SERVER) {
    /* no certificate signed by the CA, no handshake */
    gnutls_certificate_server_set_request(c->tls, GNUTLS_CERT_REQUIRE);
    gnutls_session_set_verify_cert(c->tls, NULL, 0);
  }
  else {
    if (!r->name_is_ip
        && (rc = gnutls_server_name_set(c->tls, GNUTLS_NAME_DNS, r->server_name,
                                         strlen(r->server_name))) < 0)
      return rc;
    gnutls_session_set_verify_cert(c->tls, r->server_name, 0);
  }
  gnutls_transport_set_int(c->tls, c->net);
  c->state = S_HANDSHAKE;
  return 0;
}

/* Client: a connection accepted on a listener goes to the agent. */
static void
client_accept(struct vf_relay *r, struct listener *l)
{
  for (;;) {
    struct conn *c;
    int one = 1;
    int local = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    int net;

    if (local < 0)
      return;                 /* EAGAIN, or the peer gave up: nothing to do */
    net = socket(r->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (net < 0) {
      pthread_mutex_lock(&r->lock);
      snprintf(r->stats.last_error, sizeof r->stats.last_error, "socket: %s",
                strerror(errno));
      r->stats.refused++;
      pthread_mutex_unlock(&r->lock);
      close(local);
      continue;
    }
    setsockopt(net, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c = conn_new(r, net, local, S_CONNECT, now_ns() + r->handshake_ns);
    if (c == NULL) {
      close(net);
      close(local);
      continue;
    }
    /* the route's header goes first, ahead of anything QEMU sends */
    memcpy(c->up, HEADER_MAGIC, HEADER_MAGIC_LEN);
    memcpy(c->up + HEADER_MAGIC_LEN, l->token, VF_RELAY_TOKEN_LEN);
    c->up_len = HEADER_LEN;
    if (connect(net, (struct sockaddr *) &r->addr, r->addrlen) < 0 && errno != EINPROGRESS)
      conn_end(r, c, "cannot connect to the agent: %s", strerror(errno));
  }
}

/* Server: the header names a route; the connection then reaches its socket. */
static void
server_route(struct vf_relay *r, struct conn *c)
{
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  struct route *rt;
  bool found = false;
  int fd;

  if (memcmp(c->down, HEADER_MAGIC, HEADER_MAGIC_LEN) != 0) {
    conn_end(r, c, "a tunnel connection sent no vmferry header");
    return;
  }
  pthread_mutex_lock(&r->lock);
  for (rt = r->routes; rt; rt = rt->next)
    if (same_token(rt->token, c->down + HEADER_MAGIC_LEN)) {
      strcpy(sa.sun_path, rt->path);
      found = true;
    }
  pthread_mutex_unlock(&r->lock);
  if (!found) {
    conn_end(r, c, "a tunnel connection named no prepared migration");
    return;
  }
  /* QEMU listens already; a full backlog is an error, never a wait */
  fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0 || connect(fd, (struct sockaddr *) &sa, sizeof sa) < 0) {
    int e = errno;
    if (fd >= 0)
      close(fd);
    conn_end(r, c, "cannot connect to %s: %s", sa.sun_path, strerror(e));
    return;
  }
  c->local = fd;
  c->down_off = HEADER_LEN;   /* what came after the header is payload */
  relaying(r, c);
}

static bool
again(int rc)
{
  return rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED;
}

static bool
would_block(void)
{
  return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
}

/* Moves C along as far as it goes without blocking. */
static void
step(struct vf_relay *r, struct conn *c)
{
  /* a socket that said EAGAIN is not read again in this step, whose other
   * rounds would each pay a syscall for it while the other direction
   * streams: the next poll says when it has something */
  bool local_dry = false, net_dry = false;
  int rounds;
  ssize_t n;
  int rc;

  c->busy = false;
  if (c->state == S_CONNECT) {
    int e = 0;
    socklen_t len = sizeof e;
    struct pollfd p = { .fd = c->net, .events = POLLOUT };

    if (poll(&p, 1, 0) <= 0)
      return;
    if (getsockopt(c->net, SOL_SOCKET, SO_ERROR, &e, &len) < 0)
      e = errno;
    if (e) {
      conn_end(r, c, "cannot connect to the agent: %s", strerror(e));
      return;
    }
    /* a fresh connection's send buffer takes these 8 bytes whole */
    if (send(c->net, VF_RELAY_PREFACE, VF_RELAY_PREFACE_LEN, MSG_NOSIGNAL)
        != VF_RELAY_PREFACE_LEN) {
      conn_end(r, c, "cannot write to the agent: %s", strerror(errno));
      return;
    }
    if ((rc = start_tls(r, c)) < 0) {
      conn_end(r, c, "TLS: %s", gnutls_strerror(rc));
      return;
    }
  }
  if (c->state == S_HANDSHAKE) {
    rc = gnutls_handshake(c->tls);
    if (again(rc))
      return;
    if (rc < 0) {
      const char *why = gnutls_strerror(rc);
      if (rc == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR)
        why = r->role == VF_RELAY_SERVER ? "the peer's certificate is not signed by the CA"
                                         : "the agent's certificate is not signed by the CA "
                                           "or does not name the host dialled";
      else if (r->role == VF_RELAY_SERVER && (rc == GNUTLS_E_CERTIFICATE_REQUIRED
                                              || rc == GNUTLS_E_NO_CERTIFICATE_FOUND))
        /* a client whose certificate is another CA's sends none at all */
        why = "the peer sent no certificate signed by the CA";
      else if (rc == GNUTLS_E_WARNING_ALERT_RECEIVED || rc == GNUTLS_E_FATAL_ALERT_RECEIVED)
        why = gnutls_alert_get_name(gnutls_alert_get(c->tls));
      conn_end(r, c, "TLS handshake: %s", why);
      return;
    }
    if (r->role == VF_RELAY_SERVER)
      c->state = S_HEADER;
    else
      relaying(r, c);
  }
  if (c->state == S_HEADER) {
    while (c->down_len < HEADER_LEN) {
      rc = gnutls_record_recv(c->tls, c->down + c->down_len, BUF_SIZE - c->down_len);
      if (again(rc))
        return;
      if (rc <= 0) {
        conn_end(r, c, "a tunnel connection ended before its header%s%s",
                  rc < 0 ? ": " : "", rc < 0 ? gnutls_strerror(rc) : "");
        return;
      }
      c->down_len += rc;
    }
    server_route(r, c);
    if (c->dead)
      return;
  }

  for (rounds = 0; rounds < ROUNDS; rounds++) {
    bool progress = false;

    /* up: Unix -> TLS */
    if (c->up_off == c->up_len && !c->up_eof && !local_dry) {
      n = recv(c->local, c->up, BUF_SIZE, 0);
      if (n > 0) {
        c->up_off = 0;
        c->up_len = n;
        progress = true;
      }
      else if (n == 0) {
        c->up_eof = true;
        progress = true;
      }
      else if (!would_block()) {
        conn_end(r, c, "reading the local socket: %s", strerror(errno));
        return;
      }
      else
        local_dry = true;
    }
    if (c->up_off < c->up_len) {
      /* a record per call, and all of them back to back, until the buffer
       * is sent or the socket's is full */
      while (c->up_off < c->up_len) {
        /* the same arguments again after GNUTLS_E_AGAIN, as GnuTLS requires */
        rc = gnutls_record_send(c->tls, c->up + c->up_off, c->up_len - c->up_off);
        if (rc > 0) {
          c->up_off += rc;
          __atomic_fetch_add(&r->stats.bytes_up, (uint64_t) rc, __ATOMIC_RELAXED);
          progress = true;
        }
        else if (again(rc))
          break;
        else {
          conn_end(r, c, "TLS send: %s", gnutls_strerror(rc));
          return;
        }
      }
    }
    else if (c->up_eof && !c->up_done) {
      /* close_notify: the peer's reader sees the end, its writer goes on */
      rc = gnutls_bye(c->tls, GNUTLS_SHUT_WR);
      if (rc == 0) {
        c->up_done = true;
        progress = true;
      }
      else if (!again(rc)) {
        conn_end(r, c, "TLS close: %s", gnutls_strerror(rc));
        return;
      }
    }

    /* down: TLS -> Unix; the buffer filled with every record there is
     * before one send.  GNUTLS_E_AGAIN means GnuTLS holds no record whole
     * (it returns a buffered one first), so poll tells when to go on. */
    if (c->down_off == c->down_len)
      c->down_off = c->down_len = 0;
    while (!c->down_eof && c->down_len < BUF_SIZE && !net_dry) {
      rc = gnutls_record_recv(c->tls, c->down + c->down_len, BUF_SIZE - c->down_len);
      if (rc > 0) {
        c->down_len += rc;
        progress = true;
      }
      else if (rc == 0) {
        c->down_eof = true;
        progress = true;
      }
      else if (again(rc))
        net_dry = true;
      else {
        conn_end(r, c, "TLS receive: %s",
                  rc == GNUTLS_E_PREMATURE_TERMINATION ? "the other side went away"
                                                       : gnutls_strerror(rc));
        return;
      }
    }
    if (c->down_off < c->down_len) {
      n = send(c->local, c->down + c->down_off, c->down_len - c->down_off, MSG_NOSIGNAL);
      if (n > 0) {
        c->down_off += n;
        __atomic_fetch_add(&r->stats.bytes_down, (uint64_t) n, __ATOMIC_RELAXED);
        progress = true;
      }
      else if (n < 0 && !would_block()) {
        conn_end(r, c, "writing the local socket: %s", strerror(errno));
        return;
      }
    }
    else if (c->down_eof && !c->down_done) {
      shutdown(c->local, SHUT_WR);
      c->down_done = true;
      progress = true;
    }

    if (c->up_done && c->down_done) {
      conn_end(r, c, NULL);
      return;
    }
    if (!progress)
      return;
  }
  c->busy = true;
}

/* What C waits for, as poll events on each side. */
static void
wants(struct conn *c, short *net, short *local)
{
  *net = *local = 0;
  switch (c->state) {
  case S_CONNECT:
    *net = POLLOUT;
    return;
  case S_HANDSHAKE:
  case S_HEADER:
    *net = gnutls_record_get_direction(c->tls) ? POLLOUT : POLLIN;
    return;
  case S_RELAY:
    break;
  }
  /* a send or a close_notify waits only for room to write (the direction
   * GnuTLS reports is that of its last call, maybe the receive) */
  if (c->up_off < c->up_len || (c->up_eof && !c->up_done))
    *net |= POLLOUT;
  else if (!c->up_eof)
    *local |= POLLIN;
  if (!c->down_eof && c->down_len < BUF_SIZE)
    *net |= POLLIN;
  if (c->down_off < c->down_len)
    *local |= POLLOUT;
}

/* Server: adopted connections join the loop, oldest unauthenticated ones
 * leaving when there are too many. */
static void
take_adopted(struct vf_relay *r, struct adopted *a)
{
  while (a) {
    struct adopted *next = a->next;
    struct conn *c;
    int rc;

    while (r->pending >= r->pending_cap) {
      struct conn *oldest = NULL, *i;
      for (i = r->conns; i; i = i->next)
        if (!i->dead && i->state != S_RELAY && (!oldest || i->born < oldest->born))
          oldest = i;
      if (!oldest)
        break;
      conn_end(r, oldest, "%u tunnel connections were waiting for their handshake: "
                "dropped the oldest", r->pending_cap);
    }
    c = conn_new(r, a->fd, -1, S_HANDSHAKE, a->deadline);
    if (c == NULL)
      close(a->fd);
    else if ((rc = start_tls(r, c)) < 0)
      conn_end(r, c, "TLS: %s", gnutls_strerror(rc));
    free(a);
    a = next;
  }
}

int
vf_relay_run(struct vf_relay *r, struct vf_error *err)
{
  struct pollfd *fds = NULL;
  struct listener **ls = NULL;  /* the listener behind fds[1 + i] */
  size_t cap = 0;
  int ret = 0;

  for (;;) {
    struct listener *l;
    struct adopted *adopted;
    struct conn *c, **cp;
    size_t n = 1, nl = 0, i;
    int64_t now, next = -1;
    int timeout = -1;
    bool stop, busy = false;
    struct timespec cpu;

    pthread_mutex_lock(&r->lock);
    stop = r->stop;
    adopted = r->adopted;
    r->adopted = NULL;
    for (l = r->listeners; l; l = l->next)
      nl++;
    pthread_mutex_unlock(&r->lock);
    if (stop) {
      while (adopted) {
        struct adopted *a = adopted;
        adopted = a->next;
        close(a->fd);
        free(a);
      }
      break;
    }
    take_adopted(r, adopted);

    /* deadlines, and the dead swept out */
    now = now_ns();
    for (cp = &r->conns; (c = *cp);) {
      if (!c->dead && c->state != S_RELAY && now >= c->deadline)
        conn_end(r, c, "no TLS handshake and tunnel header within %g s",
                  r->handshake_ns / 1e9);
      if (c->dead) {
        *cp = c->next;
        conn_free(c);
        continue;
      }
      if (c->state != S_RELAY && (next < 0 || c->deadline < next))
        next = c->deadline;
      busy |= c->busy;
      n += 2;
      cp = &c->next;
    }
    n += nl;
    if (n > cap) {
      struct pollfd *f = realloc(fds, n * sizeof *fds);
      struct listener **lf = f ? realloc(ls, n * sizeof *ls) : NULL;
      if (f)
        fds = f;
      if (lf == NULL) {
        ret = vf_set_error(err, VF_ERR_IO, ENOMEM, "TLS relay: out of memory");
        break;
      }
      ls = lf;
      cap = n;
    }

    fds[0] = (struct pollfd) { .fd = r->wake, .events = POLLIN };
    n = 1;
    pthread_mutex_lock(&r->lock);
    for (l = r->listeners, i = 0; l && i < nl; l = l->next, i++) {
      ls[i] = l;
      fds[n++] = (struct pollfd) { .fd = l->fd, .events = POLLIN };
    }
    pthread_mutex_unlock(&r->lock);
    nl = i;
    for (c = r->conns; c; c = c->next) {
      short ne, le;
      wants(c, &ne, &le);
      c->net_idx = c->local_idx = -1;
      if (ne) {
        c->net_idx = n;
        fds[n++] = (struct pollfd) { .fd = c->net, .events = ne };
      }
      if (le && c->local >= 0) {
        c->local_idx = n;
        fds[n++] = (struct pollfd) { .fd = c->local, .events = le };
      }
    }
    if (busy)
      timeout = 0;
    else if (next >= 0)
      timeout = (int) ((next - now + 999999) / 1000000);
    if (poll(fds, n, timeout) < 0 && errno != EINTR) {
      ret = vf_set_error(err, VF_ERR_IO, errno, "TLS relay: poll: %s", strerror(errno));
      break;
    }
    if (fds[0].revents) {
      uint64_t count;
      ssize_t got = read(r->wake, &count, sizeof count);
      (void) got;
    }
    /* listeners are only added while the loop runs (freed after it) */
    for (i = 0; i < nl; i++)
      if (fds[1 + i].revents)
        client_accept(r, ls[i]);
    for (c = r->conns; c; c = c->next) {
      bool ready = c->busy
        || (c->net_idx >= 0 && fds[c->net_idx].revents)
        || (c->local_idx >= 0 && fds[c->local_idx].revents);
      if (ready && !c->dead)
        step(r, c);
    }
    if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu) == 0) {
      pthread_mutex_lock(&r->lock);
      r->stats.cpu_ns = (uint64_t) cpu.tv_sec * 1000000000 + cpu.tv_nsec;
      pthread_mutex_unlock(&r->lock);
    }
  }
  free(fds);
  free(ls);
  return ret;
}

void
vf_relay_free(struct vf_relay *r)
{
  struct conn *c;

  if (r == NULL)
    return;
  while ((c = r->conns)) {
    r->conns = c->next;
    conn_end(r, c, NULL);
    conn_free(c);
  }
  while (r->listeners) {
    struct listener *l = r->listeners;
    r->listeners = l->next;
    close(l->fd);
    unlink(l->path);
    free(l);
  }
  while (r->routes) {
    struct route *rt = r->routes;
    r->routes = rt->next;
    free(rt);
  }
  while (r->adopted) {
    struct adopted *a = r->adopted;
    r->adopted = a->next;
    close(a->fd);
    free(a);
  }
  if (r->prio)
    gnutls_priority_deinit(r->prio);
  if (r->cred)
    gnutls_certificate_free_credentials(r->cred);
  if (r->wake >= 0)
    close(r->wake);
  pthread_mutex_destroy(&r->lock);
  free(r);
}
