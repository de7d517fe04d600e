# cython: language_level=3
"""The binding to the C copy engine in ext/.

The GIL is released around every call that can block (connecting, copying,
synchronous I/O), so a copy never stalls the interpreter and its counters
and cancel() stay usable from other threads.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.string cimport memset

from vmferry._engine cimport *

from vmferry import errors


cdef object _raise(vf_error *err):
    msg = err.msg.decode("utf-8", "replace")
    kind = err.kind
    if kind == VF_ERR_USAGE:
        cls = errors.UsageError
    elif kind == VF_ERR_CONNECT:
        cls = errors.ConnectError
    elif kind == VF_ERR_ENDPOINT:
        cls = errors.EndpointError
    elif kind == VF_ERR_CANCELLED:
        cls = errors.Cancelled
    else:
        cls = errors.CopyError
    raise cls(msg, errno=err.errnum)


DEFAULT_CONNECTIONS = VF_DEFAULT_CONNECTIONS
DEFAULT_REQUESTS = VF_DEFAULT_REQUESTS
DEFAULT_REQUEST_SIZE = VF_DEFAULT_REQUEST_SIZE
DEFAULT_BUFFER_BYTES = VF_DEFAULT_BUFFER_BYTES
ZC_REQUEST_SIZE = VF_ZC_REQUEST_SIZE
ZC_REQUESTS = VF_ZC_REQUESTS
_ZERO_COPY = {"auto": VF_ZERO_COPY_AUTO, "on": VF_ZERO_COPY_ON, "off": VF_ZERO_COPY_OFF}


cdef class _InUse:
    """Frees its C object only when no call into it is running.

    close() may come from any thread while run() or an I/O call still works
    in the C object without the GIL (a second Ctrl-C, a cancelled task, a
    callback); freeing it then would pull the memory from under that call.
    Calls that release the GIL hold an "active" count instead, and close()
    during one only interrupts it and leaves the free to the last of them
    (as uvloop's handles do).  The count changes only with the GIL held.
    __dealloc__ cannot race a call: the call holds a reference to self.
    """
    cdef unsigned _active
    cdef bint _closing

    cdef int _check(self) except -1:
        if self._closing or not self._alive():
            raise errors.UsageError(self._closed_message())
        return 0

    cdef int _enter(self) except -1:
        self._check()
        self._active += 1
        return 0

    cdef void _leave(self):
        self._active -= 1
        if self._closing and self._active == 0:
            self._free()

    def close(self):
        """Release the C object now, or at the end of the call still using it
        (which is asked to stop first)."""
        self._closing = True
        if self._active:
            self._interrupt()
        else:
            self._free()

    cdef bint _alive(self):
        return False

    cdef void _interrupt(self):
        pass

    cdef void _free(self):
        pass

    cdef str _closed_message(self):
        return "closed"


cdef class Copier(_InUse):
    """One copy: open() connects and checks, run() moves the data.

    rate: bytes per second for the whole copy, 0 for no limit.
    zero_copy: "auto" (zero-copy lanes where both ends allow, else libnbd),
    "on" (zero-copy or UsageError/EndpointError saying why not), "off".

    run() blocks without the GIL; counters() and cancel() may be called
    from any other thread meanwhile.
    """
    cdef vf_copy *_c
    cdef bytes _src, _dst, _bitmap, _extents_from

    def __cinit__(self, str src, str dst, *, unsigned connections=0,
                  unsigned threads=0, unsigned requests=0,
                  unsigned request_size=0, unsigned long long buffer_bytes=0,
                  str bitmap=None, str extents_from=None, bint allocated=False,
                  bint destination_is_zero=False, bint flush=False,
                  bint zero_detect=True, bint force_multi_conn=False,
                  unsigned long long rate=0, unsigned long long range_start=0,
                  unsigned long long range_end=0, str zero_copy="auto",
                  bint warm_servers=True):
        cdef vf_copy_config cfg
        cdef vf_error err
        memset(&cfg, 0, sizeof(cfg))
        memset(&err, 0, sizeof(err))
        self._src = src.encode()
        self._dst = dst.encode()
        self._bitmap = bitmap.encode() if bitmap is not None else None
        cfg.src = self._src
        cfg.dst = self._dst
        cfg.bitmap = <const char *>self._bitmap if self._bitmap is not None else NULL
        self._extents_from = extents_from.encode() if extents_from is not None else None
        cfg.extents_from = (<const char *>self._extents_from
                            if self._extents_from is not None else NULL)
        cfg.connections = connections
        cfg.threads = threads
        cfg.requests = requests
        cfg.request_size = request_size
        cfg.buffer_bytes = buffer_bytes
        cfg.allocated = allocated
        cfg.destination_is_zero = destination_is_zero
        cfg.flush = flush
        cfg.no_zero_detect = not zero_detect
        cfg.force_multi_conn = force_multi_conn
        cfg.rate = rate
        cfg.range_start = range_start
        cfg.range_end = range_end
        cfg.no_warm = not warm_servers
        if zero_copy not in _ZERO_COPY:
            raise errors.UsageError(f"zero_copy must be auto, on or off, not {zero_copy!r}")
        cfg.zero_copy = _ZERO_COPY[zero_copy]
        with nogil:
            self._c = vf_copy_open(&cfg, &err)
        if self._c == NULL:
            _raise(&err)

    def run(self):
        cdef vf_error err
        cdef int r
        memset(&err, 0, sizeof(err))
        self._enter()
        try:
            with nogil:
                r = vf_copy_run(self._c, &err)
        finally:
            self._leave()
        if r == -1:
            _raise(&err)

    def cancel(self):
        if self._c != NULL:
            vf_copy_cancel(self._c)

    def counters(self):
        """(total, read, written, zeroed, skipped, done_below) in bytes."""
        cdef vf_counters n
        self._check()
        vf_copy_counters(self._c, &n)
        return (n.total, n.read, n.written, n.zeroed, n.skipped, n.done_below)

    @property
    def connections(self):
        self._check()
        return vf_copy_connections(self._c)

    @property
    def zero_copy(self) -> bool:
        """True when the data moves on zero-copy lanes, False on libnbd lanes."""
        self._check()
        return vf_copy_zero_copy(self._c) != 0

    @property
    def zero_copy_note(self) -> str:
        """Why zero-copy lanes were not used ("" when they were)."""
        self._check()
        return vf_copy_zero_copy_note(self._c).decode("utf-8", "replace")

    cdef bint _alive(self):
        return self._c != NULL

    cdef void _interrupt(self):
        vf_copy_cancel(self._c)

    cdef void _free(self):
        cdef vf_copy *c = self._c
        self._c = NULL
        if c != NULL:
            with nogil:
                vf_copy_close(c)

    cdef str _closed_message(self):
        return "this copy is closed"

    def __dealloc__(self):
        if self._c != NULL:
            vf_copy_close(self._c)


cdef class Endpoint(_InUse):
    """An NBD server, file or block device for synchronous I/O.

    Reads go straight into the caller's buffer and writes straight from
    it (any object with the buffer protocol); nothing is copied in between.
    """
    cdef vf_endpoint *_ep
    cdef readonly str uri
    cdef readonly bint writable

    def __cinit__(self, str uri, bint writable=False):
        cdef vf_error err
        cdef bytes u = uri.encode()
        cdef const char *cu = u
        memset(&err, 0, sizeof(err))
        self.uri = uri
        self.writable = writable
        with nogil:
            self._ep = vf_endpoint_open(cu, writable, &err)
        if self._ep == NULL:
            _raise(&err)

    cdef bint _alive(self):
        return self._ep != NULL

    cdef void _free(self):
        cdef vf_endpoint *ep = self._ep
        self._ep = NULL
        if ep != NULL:
            with nogil:
                vf_endpoint_close(ep)

    cdef str _closed_message(self):
        return f"endpoint {self.uri} is closed"

    @property
    def size(self) -> int:
        self._check()
        return vf_endpoint_size(self._ep)

    cdef _buffer_io(self, buf, unsigned long long offset, bint write):
        """pread_into and pwrite: BUF held as a buffer for the call, the GIL
        released around the I/O."""
        cdef Py_buffer view
        cdef vf_error err
        cdef int r
        memset(&err, 0, sizeof(err))
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE if write else PyBUF_WRITABLE)
        try:
            self._enter()
            try:
                with nogil:
                    if write:
                        r = vf_endpoint_pwrite(self._ep, view.buf, view.len, offset, &err)
                    else:
                        r = vf_endpoint_pread(self._ep, view.buf, view.len, offset, &err)
            finally:
                self._leave()
        finally:
            PyBuffer_Release(&view)
        if r == -1:
            _raise(&err)

    def pread_into(self, buf, unsigned long long offset):
        """Fill the whole writable buffer buf with bytes from offset."""
        self._buffer_io(buf, offset, False)

    def pread(self, size_t count, unsigned long long offset) -> bytearray:
        buf = bytearray(count)
        self.pread_into(buf, offset)
        return buf

    def pwrite(self, buf, unsigned long long offset):
        """Write the whole buffer buf at offset."""
        self._buffer_io(buf, offset, True)

    def zero(self, unsigned long long offset, unsigned long long length):
        cdef vf_error err
        cdef int r
        memset(&err, 0, sizeof(err))
        self._enter()
        try:
            with nogil:
                r = vf_endpoint_zero(self._ep, length, offset, &err)
        finally:
            self._leave()
        if r == -1:
            _raise(&err)

    def flush(self):
        cdef vf_error err
        cdef int r
        memset(&err, 0, sizeof(err))
        self._enter()
        try:
            with nogil:
                r = vf_endpoint_flush(self._ep, &err)
        finally:
            self._leave()
        if r == -1:
            _raise(&err)

    def warm(self):
        """Send the server the one large read a copy sends first, which keeps a
        QEMU NBD server's request buffers in its heap for good (ext/nbd_ops.c):
        for a copy another program makes, such as QEMU's mirror.  Best effort:
        a server that fails it or does not take large requests is left as it
        was.  On a writable endpoint the read goes to a hole."""
        self._enter()
        try:
            with nogil:
                vf_endpoint_warm(self._ep)
        finally:
            self._leave()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __dealloc__(self):
        if self._ep != NULL:
            vf_endpoint_close(self._ep)


def libnbd_version() -> str:
    """The version of the libnbd the engine runs with."""
    return vf_libnbd_version().decode()


RELAY_PREFACE = (<bytes>VF_RELAY_PREFACE)[:VF_RELAY_PREFACE_LEN]
RELAY_TOKEN_LEN = VF_RELAY_TOKEN_LEN


cdef class Relay(_InUse):
    """The --tunnelled TLS relay (ext/tunnel.c): role "client" listens on
    Unix sockets and carries each connection to the agent at ADDRESS:PORT
    (a numeric IP; its certificate must name SERVER_NAME); role "server"
    takes connections the agent's listener adopts and routes them by token.

    run() relays without the GIL until stop() (or close()); the other
    methods may be called from any thread meanwhile.
    """
    cdef vf_relay *_r

    def __cinit__(self, str role, str ca_file, str cert_file, str key_file, *,
                  str address=None, unsigned port=0, str server_name=None,
                  unsigned handshake_ms=0, unsigned pending_cap=0):
        cdef vf_relay_config cfg
        cdef vf_error err
        memset(&cfg, 0, sizeof(cfg))
        memset(&err, 0, sizeof(err))
        if role not in ("client", "server"):
            raise errors.UsageError(f"a relay is a client or a server, not {role!r}")
        cdef bytes ca = ca_file.encode(), cert = cert_file.encode(), key = key_file.encode()
        cdef bytes addr = (address or "").encode(), name = (server_name or "").encode()
        cfg.role = VF_RELAY_CLIENT if role == "client" else VF_RELAY_SERVER
        cfg.ca_file = ca
        cfg.cert_file = cert
        cfg.key_file = key
        cfg.address = <const char *>addr if address is not None else NULL
        cfg.port = port
        cfg.server_name = <const char *>name if server_name is not None else NULL
        cfg.handshake_ms = handshake_ms
        cfg.pending_cap = pending_cap
        with nogil:
            self._r = vf_relay_new(&cfg, &err)
        if self._r == NULL:
            _raise(&err)

    def listen(self, str path, str token):
        """Client: connections to the Unix socket PATH go to route TOKEN."""
        cdef vf_error err
        cdef bytes p = path.encode(), t = token.encode()
        memset(&err, 0, sizeof(err))
        self._check()
        if vf_relay_listen(self._r, p, t, &err) == -1:
            _raise(&err)

    def route(self, str token, str path):
        """Server: connections presenting TOKEN reach the Unix socket PATH."""
        cdef vf_error err
        cdef bytes p = path.encode(), t = token.encode()
        memset(&err, 0, sizeof(err))
        self._check()
        if vf_relay_route(self._r, t, p, &err) == -1:
            _raise(&err)

    def unroute(self, str token):
        cdef bytes t = token.encode()
        if self._r != NULL:
            vf_relay_unroute(self._r, t)

    def adopt(self, int fd, unsigned timeout_ms):
        """Server: takes FD (always: closed on failure), whose handshake and
        header must be done within TIMEOUT_MS."""
        cdef vf_error err
        memset(&err, 0, sizeof(err))
        if self._closing or self._r == NULL:
            import os
            os.close(fd)
            self._check()
        if vf_relay_adopt(self._r, fd, timeout_ms, &err) == -1:
            _raise(&err)

    def run(self):
        cdef vf_error err
        cdef int r
        memset(&err, 0, sizeof(err))
        self._enter()
        try:
            with nogil:
                r = vf_relay_run(self._r, &err)
        finally:
            self._leave()
        if r == -1:
            _raise(&err)

    def stop(self):
        if self._r != NULL:
            vf_relay_stop(self._r)

    def stats(self) -> dict:
        """Bytes each way, connections relayed, refused and failed, the
        relay thread's CPU seconds, and why the last one was refused or failed."""
        cdef vf_relay_stats s
        self._check()
        vf_relay_get_stats(self._r, &s)
        return {"bytes_up": s.bytes_up, "bytes_down": s.bytes_down,
                "connections": s.connections, "refused": s.refused, "failed": s.failed,
                "cpu_s": s.cpu_ns / 1e9, "active": s.active,
                "last_error": s.last_error.decode("utf-8", "replace")}

    cdef bint _alive(self):
        return self._r != NULL

    cdef void _interrupt(self):
        vf_relay_stop(self._r)

    cdef void _free(self):
        cdef vf_relay *r = self._r
        self._r = NULL
        if r != NULL:
            with nogil:
                vf_relay_free(r)

    cdef str _closed_message(self):
        return "this relay is closed"

    def __dealloc__(self):
        if self._r != NULL:
            vf_relay_free(self._r)
