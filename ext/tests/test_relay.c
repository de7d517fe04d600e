/* The --tunnelled TLS relay (tunnel.c) end to end in one process: a client
 * relay listening on a Unix socket, a server relay fed by a small "agent"
 * that reads the preface as the real agent does, and a Unix socket behind
 * it, all over TCP on 127.0.0.1 with certificates made here.
 *
 * Streams both ways through tiny socket buffers (partial writes on every
 * side), both ways at once through the usual ones (whole buffers of
 * records), half-closes, a peer closing mid-stream, strangers (wrong token,
 * another CA's certificate, a wrong server name, silence) and the cap on
 * connections still shaking hands.  Run under ASan/UBSan by ctest.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <gnutls/gnutls.h>
#include <gnutls/crypto.h>
#include <gnutls/x509.h>

#include "check.h"
#include "vmferry.h"

static char dir[] = "/tmp/vmferry-relay-XXXXXX";
static const char TOKEN[] = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
static const char OTHER[] = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

static const char *
path(const char *name)
{
  static char bufs[16][256];
  static int next;
  char *p = bufs[next++ % 16];
  snprintf(p, 256, "%s/%s", dir, name);
  return p;
}

/* -- certificates ------------------------------------------------------- */

static void
save(const char *file, gnutls_datum_t *d)
{
  FILE *f = fopen(file, "w");
  if (!f || fwrite(d->data, 1, d->size, f) != d->size) {
    perror(file);
    exit(1);
  }
  fclose(f);
  gnutls_free(d->data);
}

static void
make_cert(const char *name, const char *cn, bool ca, gnutls_x509_crt_t issuer,
           gnutls_x509_privkey_t issuer_key, bool server, gnutls_x509_crt_t *crt_out,
           gnutls_x509_privkey_t *key_out)
{
  gnutls_x509_privkey_t key;
  gnutls_x509_crt_t crt;
  gnutls_datum_t d;
  unsigned char serial[8];
  time_t now = time(NULL);
  char file[256];
  int rc = 0;

  rc |= gnutls_x509_privkey_init(&key);
  rc |= gnutls_x509_privkey_generate(key, GNUTLS_PK_ECDSA,
                                      GNUTLS_CURVE_TO_BITS(GNUTLS_ECC_CURVE_SECP256R1), 0);
  rc |= gnutls_x509_crt_init(&crt);
  rc |= gnutls_x509_crt_set_version(crt, 3);
  gnutls_rnd(GNUTLS_RND_NONCE, serial, sizeof serial);
  serial[0] &= 0x7f;
  rc |= gnutls_x509_crt_set_serial(crt, serial, sizeof serial);
  rc |= gnutls_x509_crt_set_activation_time(crt, now - 3600);
  rc |= gnutls_x509_crt_set_expiration_time(crt, now + 86400);
  rc |= gnutls_x509_crt_set_dn_by_oid(crt, GNUTLS_OID_X520_COMMON_NAME, 0, cn, strlen(cn));
  rc |= gnutls_x509_crt_set_key(crt, key);
  rc |= gnutls_x509_crt_set_basic_constraints(crt, ca, -1);
  if (ca)
    rc |= gnutls_x509_crt_set_key_usage(crt, GNUTLS_KEY_KEY_CERT_SIGN | GNUTLS_KEY_CRL_SIGN);
  else {
    rc |= gnutls_x509_crt_set_key_usage(crt, GNUTLS_KEY_DIGITAL_SIGNATURE);
    rc |= gnutls_x509_crt_set_key_purpose_oid(crt, server ? GNUTLS_KP_TLS_WWW_SERVER
                                                           : GNUTLS_KP_TLS_WWW_CLIENT, 0);
  }
  if (server) {
    unsigned char ip[4] = { 127, 0, 0, 1 };
    rc |= gnutls_x509_crt_set_subject_alt_name(crt, GNUTLS_SAN_IPADDRESS, ip, 4,
                                                GNUTLS_FSAN_SET);
  }
  rc |= gnutls_x509_crt_sign2(crt, issuer ? issuer : crt, issuer ? issuer_key : key,
                               GNUTLS_DIG_SHA256, 0);
  if (rc < 0) {
    fprintf(stderr, "making the %s certificate failed\n", name);
    exit(1);
  }
  gnutls_x509_crt_export2(crt, GNUTLS_X509_FMT_PEM, &d);
  snprintf(file, sizeof file, "%s/%s-cert.pem", dir, name);
  save(file, &d);
  gnutls_x509_privkey_export2(key, GNUTLS_X509_FMT_PEM, &d);
  snprintf(file, sizeof file, "%s/%s-key.pem", dir, name);
  save(file, &d);
  if (crt_out) {
    *crt_out = crt;
    *key_out = key;
  }
  else {
    gnutls_x509_crt_deinit(crt);
    gnutls_x509_privkey_deinit(key);
  }
}

static void
make_pki(void)
{
  gnutls_x509_crt_t ca, rogue;
  gnutls_x509_privkey_t ca_key, rogue_key;

  make_cert("ca", "test CA", true, NULL, NULL, false, &ca, &ca_key);
  make_cert("server", "127.0.0.1", false, ca, ca_key, true, NULL, NULL);
  make_cert("client", "test client", false, ca, ca_key, false, NULL, NULL);
  make_cert("rogue-ca", "another CA", true, NULL, NULL, false, &rogue, &rogue_key);
  make_cert("rogue", "test client", false, rogue, rogue_key, false, NULL, NULL);
  gnutls_x509_crt_deinit(ca);
  gnutls_x509_privkey_deinit(ca_key);
  gnutls_x509_crt_deinit(rogue);
  gnutls_x509_privkey_deinit(rogue_key);
}

/* -- relays in threads ------------------------------------------------------ */

struct running {
  struct vf_relay *r;
  pthread_t thread;
  int rc;
  struct vf_error err;
};

static void *
run_relay(void *arg)
{
  struct running *x = arg;
  x->rc = vf_relay_run(x->r, &x->err);
  return NULL;
}

static void
start(struct running *x, struct vf_relay *r)
{
  memset(x, 0, sizeof *x);
  x->r = r;
  pthread_create(&x->thread, NULL, run_relay, x);
}

static void
stop(struct running *x)
{
  vf_relay_stop(x->r);
  pthread_join(x->thread, NULL);
  CHECK(x->rc == 0, "the relay loop failed: %s", x->err.msg);
  vf_relay_free(x->r);
}

static int agent_port;
static int agent_listen = -1;
static unsigned adopt_ms = 2000;
static struct vf_relay *server;

/* What the agent's listener does: the preface read in the clear, then the
 * connection handed to the server relay. */
static void *
agent(void *arg)
{
  for (;;) {
    char pre[VF_RELAY_PREFACE_LEN];
    struct timeval tv = { .tv_sec = 2 };
    struct vf_error err = { 0 };
    int fd = accept(agent_listen, NULL, NULL);
    if (fd < 0)
      return NULL;            /* shut down */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (recv(fd, pre, sizeof pre, MSG_WAITALL) != sizeof pre
        || memcmp(pre, VF_RELAY_PREFACE, sizeof pre) != 0) {
      close(fd);
      continue;
    }
    if (vf_relay_adopt(server, fd, adopt_ms, &err) < 0)
      fprintf(stderr, "adopt: %s\n", err.msg);
  }
}

static struct vf_relay *
client(const char *cert, const char *name, const char *sock, const char *token)
{
  char c[256], k[256];
  struct vf_error err = { 0 };
  struct vf_relay_config cfg = {
    .role = VF_RELAY_CLIENT, .ca_file = path("ca-cert.pem"), .cert_file = c,
    .key_file = k, .address = "127.0.0.1", .port = agent_port, .server_name = name,
    .handshake_ms = 3000,
  };
  struct vf_relay *r;

  snprintf(c, sizeof c, "%s/%s-cert.pem", dir, cert);
  snprintf(k, sizeof k, "%s/%s-key.pem", dir, cert);
  r = vf_relay_new(&cfg, &err);
  if (r == NULL || vf_relay_listen(r, sock, token, &err) < 0) {
    fprintf(stderr, "client relay: %s\n", err.msg);
    exit(1);
  }
  return r;
}

/* -- byte streams ----------------------------------------------------------- */

static int
unix_listen(const char *p)
{
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  strcpy(sa.sun_path, p);
  if (bind(fd, (struct sockaddr *) &sa, sizeof sa) < 0 || listen(fd, 8) < 0) {
    perror(p);
    exit(1);
  }
  return fd;
}

/* A small buffer on each local socket, so that every write the relay makes
 * into it is a partial one. */
static void
tiny(int fd)
{
  int size = 4096;
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
}

static int
unix_connect_sized(const char *p, bool small)
{
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  strcpy(sa.sun_path, p);
  if (small)
    tiny(fd);
  if (connect(fd, (struct sockaddr *) &sa, sizeof sa) < 0) {
    perror(p);
    exit(1);
  }
  return fd;
}

static int
unix_connect(const char *p)
{
  return unix_connect_sized(p, true);
}

static unsigned char
pattern(uint64_t i, unsigned seed)
{
  return (unsigned char) ((i * 2654435761u) >> 13) ^ seed;
}

struct stream {
  int fd;
  uint64_t bytes;             /* to write, or read at most */
  unsigned seed;
  size_t chunk;
  bool half_close;            /* shutdown(SHUT_WR) after writing */
  uint64_t done;              /* written or read and checked */
  bool bad;                   /* a byte differed */
  bool eof, error;
};

static void *
writer(void *arg)
{
  struct stream *s = arg;
  unsigned char *buf = malloc(s->chunk);
  while (s->done < s->bytes) {
    size_t n = s->bytes - s->done < s->chunk ? s->bytes - s->done : s->chunk;
    ssize_t w;
    for (size_t i = 0; i < n; i++)
      buf[i] = pattern(s->done + i, s->seed);
    w = send(s->fd, buf, n, MSG_NOSIGNAL);
    if (w <= 0) {
      s->error = true;
      break;
    }
    s->done += w;
  }
  if (s->half_close && !s->error)
    shutdown(s->fd, SHUT_WR);
  free(buf);
  return NULL;
}

/* Reads up to s->bytes (then expects the end) checking the pattern. */
static void
reader(struct stream *s)
{
  unsigned char *buf = malloc(s->chunk);
  for (;;) {
    ssize_t n = recv(s->fd, buf, s->chunk, 0);
    if (n == 0) {
      s->eof = true;
      break;
    }
    if (n < 0) {
      s->error = true;
      break;
    }
    for (ssize_t i = 0; i < n; i++)
      if (buf[i] != pattern(s->done + i, s->seed))
        s->bad = true;
    s->done += n;
    if (s->done > s->bytes)
      break;
  }
  free(buf);
}

struct target {
  int listen;
  struct stream in;           /* what arrives through the tunnel */
  struct stream out;          /* what goes back */
  uint64_t close_after;       /* >0: close once this much arrived */
  bool duplex;                /* write back while reading, usual buffers */
};

static void *
target(void *arg)
{
  struct target *t = arg;
  int fd = accept(t->listen, NULL, NULL);
  if (!t->duplex)
    tiny(fd);
  t->in.fd = t->out.fd = fd;
  if (t->duplex) {
    pthread_t wt;
    pthread_create(&wt, NULL, writer, &t->out);
    reader(&t->in);
    pthread_join(wt, NULL);
    close(fd);
    return NULL;
  }
  if (t->close_after) {
    t->in.bytes = t->close_after - 1;
    reader(&t->in);          /* stops just past close_after */
    close(fd);
    return NULL;
  }
  reader(&t->in);
  writer(&t->out);
  close(fd);
  return NULL;
}

/* Whether FD's peer ends the connection (EOF or reset) within MS. */
static bool
ends_within(int fd, int ms)
{
  struct pollfd p = { .fd = fd, .events = POLLIN };
  char c[4096];
  for (;;) {
    if (poll(&p, 1, ms) <= 0)
      return false;
    ssize_t n = recv(fd, c, sizeof c, MSG_DONTWAIT);
    if (n <= 0)
      return n == 0 || (errno != EAGAIN && errno != EINTR);
  }
}

/* -- the tests -------------------------------------------------------------- */

static void
test_both_ways(const char *sock, int tlisten)
{
  struct target t = {
    .listen = tlisten,
    .in = { .bytes = 8 << 20, .seed = 1, .chunk = 1000 },
    .out = { .bytes = 3 << 20, .seed = 2, .chunk = 7777 },
  };
  struct stream up = { .bytes = 8 << 20, .seed = 1, .chunk = 7777, .half_close = true };
  struct stream down = { .bytes = 3 << 20, .seed = 2, .chunk = 999 };
  pthread_t tt, wt;

  pthread_create(&tt, NULL, target, &t);
  up.fd = down.fd = unix_connect(sock);
  pthread_create(&wt, NULL, writer, &up);
  reader(&down);
  pthread_join(wt, NULL);
  pthread_join(tt, NULL);
  close(up.fd);
  CHECK(!up.error && up.done == 8 << 20, "wrote %lu", (unsigned long) up.done);
  CHECK(t.in.eof && t.in.done == 8 << 20 && !t.in.bad,
         "the far side read %lu bytes, eof %d, bad %d", (unsigned long) t.in.done, t.in.eof,
         t.in.bad);
  CHECK(down.eof && down.done == 3 << 20 && !down.bad,
         "read back %lu bytes, eof %d, bad %d", (unsigned long) down.done, down.eof, down.bad);
}

/* Both directions at once through the sockets' usual buffers: whole
 * buffers of records back to back each way, the two directions' reads and
 * writes interleaved in the same steps of the loop. */
static void
test_full_duplex(const char *sock, int tlisten)
{
  struct target t = {
    .listen = tlisten, .duplex = true,
    .in = { .bytes = 48 << 20, .seed = 4, .chunk = 1 << 20 },
    .out = { .bytes = 40 << 20, .seed = 5, .chunk = 200000 },
  };
  struct stream up = { .bytes = 48 << 20, .seed = 4, .chunk = 300000, .half_close = true };
  struct stream down = { .bytes = 40 << 20, .seed = 5, .chunk = 1 << 20 };
  pthread_t tt, wt;

  pthread_create(&tt, NULL, target, &t);
  up.fd = down.fd = unix_connect_sized(sock, false);
  pthread_create(&wt, NULL, writer, &up);
  reader(&down);
  pthread_join(wt, NULL);
  pthread_join(tt, NULL);
  close(up.fd);
  CHECK(!up.error && up.done == 48 << 20, "wrote %lu", (unsigned long) up.done);
  CHECK(t.in.eof && t.in.done == 48 << 20 && !t.in.bad,
         "the far side read %lu bytes, eof %d, bad %d", (unsigned long) t.in.done, t.in.eof,
         t.in.bad);
  CHECK(!t.out.error && t.out.done == 40 << 20, "the far side wrote %lu",
         (unsigned long) t.out.done);
  CHECK(down.eof && down.done == 40 << 20 && !down.bad,
         "read back %lu bytes, eof %d, bad %d", (unsigned long) down.done, down.eof, down.bad);
}

static void
test_peer_closes_mid_stream(const char *sock, int tlisten)
{
  struct target t = { .listen = tlisten, .in = { .seed = 3, .chunk = 4096 },
                      .close_after = 1 << 20 };
  struct stream up = { .bytes = 64 << 20, .seed = 3, .chunk = 65536 };
  pthread_t tt, wt;

  pthread_create(&tt, NULL, target, &t);
  up.fd = unix_connect(sock);
  pthread_create(&wt, NULL, writer, &up);
  pthread_join(tt, NULL);
  /* the writer must be stopped by the far side's close, not block forever */
  CHECK(ends_within(up.fd, 5000), "the tunnel did not end when its far side closed");
  shutdown(up.fd, SHUT_RDWR);
  pthread_join(wt, NULL);
  close(up.fd);
  CHECK(!t.in.bad && t.in.done >= 1 << 20, "the far side read %lu bytes",
         (unsigned long) t.in.done);
  CHECK(up.done < 64 << 20, "all 64 MiB went into a closed connection");
}

static void
test_refused(const char *cert, const char *name, const char *token, struct vf_relay *who,
              const char *why)
{
  struct vf_relay_stats before, after;
  const char *sock = path("stranger.sock");
  struct running x;
  int fd;

  vf_relay_get_stats(who, &before);
  start(&x, client(cert, name, sock, token));
  fd = unix_connect(sock);
  CHECK(ends_within(fd, 5000), "%s: the connection was not closed", why);
  close(fd);
  vf_relay_get_stats(who, &after);
  CHECK(after.refused == before.refused + 1, "%s: refused %lu -> %lu", why,
         (unsigned long) before.refused, (unsigned long) after.refused);
  CHECK(strstr(after.last_error, why) != NULL, "expected '%s' in '%s'", why,
         after.last_error);
  stop(&x);
}

static int
tcp_preface_only(void)
{
  struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(agent_port) };
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, (struct sockaddr *) &sa, sizeof sa) < 0
      || send(fd, VF_RELAY_PREFACE, VF_RELAY_PREFACE_LEN, 0) != VF_RELAY_PREFACE_LEN) {
    perror("connect");
    exit(1);
  }
  return fd;
}

static void
test_silence_and_cap(void)
{
  struct vf_relay_stats st;
  int a, b, c;

  adopt_ms = 300;
  a = tcp_preface_only();
  CHECK(ends_within(a, 3000), "a silent connection outlived its handshake deadline");
  close(a);
  vf_relay_get_stats(server, &st);
  CHECK(strstr(st.last_error, "no TLS handshake") != NULL, "%s", st.last_error);

  /* the server relay holds at most 2 connections still shaking hands */
  adopt_ms = 10000;
  a = tcp_preface_only();
  usleep(100000);
  b = tcp_preface_only();
  usleep(100000);
  c = tcp_preface_only();
  CHECK(ends_within(a, 3000), "the oldest silent connection was not evicted");
  CHECK(!ends_within(c, 300), "the newest silent connection was dropped");
  vf_relay_get_stats(server, &st);
  CHECK(strstr(st.last_error, "waiting for their handshake") != NULL, "%s", st.last_error);
  close(a);
  close(b);
  close(c);
}

int
main(void)
{
  struct sockaddr_in sa = { .sin_family = AF_INET };
  socklen_t len = sizeof sa;
  struct running s, cl;
  struct vf_relay_stats st;
  struct vf_error err = { 0 };
  pthread_t agent_thread;
  int tlisten;

  signal(SIGPIPE, SIG_IGN);
  if (mkdtemp(dir) == NULL) {
    perror("mkdtemp");
    return 1;
  }
  make_pki();

  agent_listen = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(agent_listen, (struct sockaddr *) &sa, sizeof sa) < 0
      || listen(agent_listen, 16) < 0
      || getsockname(agent_listen, (struct sockaddr *) &sa, &len) < 0) {
    perror("listen");
    return 1;
  }
  agent_port = ntohs(sa.sin_port);
  {
    struct vf_relay_config cfg = {
      .role = VF_RELAY_SERVER, .ca_file = path("ca-cert.pem"),
      .cert_file = path("server-cert.pem"), .key_file = path("server-key.pem"),
      .pending_cap = 2,
    };
    server = vf_relay_new(&cfg, &err);
    CHECK(server != NULL, "%s", err.msg);
    if (!server)
      return finish(dir);
  }
  tlisten = unix_listen(path("qemu.sock"));
  CHECK(vf_relay_route(server, TOKEN, path("qemu.sock"), &err) == 0, "%s", err.msg);
  CHECK(vf_relay_route(server, "not-a-token", path("qemu.sock"), &err) == -1,
         "a malformed token was routed");
  start(&s, server);
  pthread_create(&agent_thread, NULL, agent, NULL);

  start(&cl, client("client", "127.0.0.1", path("tunnel.sock"), TOKEN));
  test_peer_closes_mid_stream(path("tunnel.sock"), tlisten);
  test_both_ways(path("tunnel.sock"), tlisten);
  test_both_ways(path("tunnel.sock"), tlisten);      /* the relay outlives its streams */
  vf_relay_get_stats(cl.r, &st);
  CHECK(st.bytes_up >= (16u << 20) + (1 << 20) && st.bytes_down == 6u << 20,
         "client counted %lu up, %lu down", (unsigned long) st.bytes_up,
         (unsigned long) st.bytes_down);
  CHECK(st.connections == 3, "client: %lu connections", (unsigned long) st.connections);
  stop(&cl);
  /* the far side's close resets the server relay's Unix socket: a failure
   * there; the client's end may see it as one too, or as an orderly end */
  vf_relay_get_stats(server, &st);
  CHECK(st.connections == 3 && st.failed == 1, "server: %lu connections, %lu failed",
         (unsigned long) st.connections, (unsigned long) st.failed);

  start(&cl, client("client", "127.0.0.1", path("duplex.sock"), TOKEN));
  test_full_duplex(path("duplex.sock"), tlisten);
  vf_relay_get_stats(cl.r, &st);
  /* up: the payload and the route's header (magic and token) before it */
  CHECK(st.bytes_up == (48u << 20) + 8 + VF_RELAY_TOKEN_LEN && st.bytes_down == 40u << 20 && st.failed == 0,
         "client counted %lu up, %lu down, %lu failed", (unsigned long) st.bytes_up,
         (unsigned long) st.bytes_down, (unsigned long) st.failed);
  stop(&cl);

  test_refused("client", "127.0.0.1", OTHER, server, "named no prepared migration");
  test_refused("rogue", "127.0.0.1", TOKEN, server, "signed by the CA");
  {
    /* the client checks the agent's name: this certificate is 127.0.0.1's */
    struct running x;
    int fd;
    start(&x, client("client", "10.9.9.9", path("wrongname.sock"), TOKEN));
    fd = unix_connect(path("wrongname.sock"));
    CHECK(ends_within(fd, 5000), "a wrong server name was accepted");
    close(fd);
    vf_relay_get_stats(x.r, &st);
    CHECK(st.refused == 1 && strstr(st.last_error, "agent's certificate"),
           "client: %s", st.last_error);
    stop(&x);
    usleep(300000);          /* the server's side of it counted before the next */
  }
  vf_relay_unroute(server, TOKEN);
  test_refused("client", "127.0.0.1", TOKEN, server, "named no prepared migration");
  test_silence_and_cap();

  shutdown(agent_listen, SHUT_RDWR);
  pthread_join(agent_thread, NULL);
  close(agent_listen);
  stop(&s);
  close(tlisten);
  return finish(dir);
}
