# Mirrors ext/vmferry.h line for line; change both together.
from libc.stdint cimport int64_t, uint32_t, uint64_t


cdef extern from "vmferry.h" nogil:
    enum vf_error_kind:
        VF_ERR_NONE
        VF_ERR_USAGE
        VF_ERR_CONNECT
        VF_ERR_ENDPOINT
        VF_ERR_IO
        VF_ERR_CANCELLED

    struct vf_error:
        int kind
        int errnum
        char msg[512]

    int VF_DEFAULT_CONNECTIONS
    int VF_DEFAULT_REQUESTS
    int VF_DEFAULT_REQUEST_SIZE
    int VF_DEFAULT_BUFFER_BYTES
    int VF_ZC_REQUEST_SIZE
    int VF_ZC_REQUESTS

    enum vf_zero_copy:
        VF_ZERO_COPY_AUTO
        VF_ZERO_COPY_ON
        VF_ZERO_COPY_OFF

    struct vf_copy_config:
        const char *src
        const char *dst
        unsigned connections
        unsigned threads
        unsigned requests
        uint32_t request_size
        uint64_t buffer_bytes
        const char *bitmap
        const char *extents_from
        int allocated
        int destination_is_zero
        int flush
        int no_zero_detect
        int force_multi_conn
        uint64_t rate
        uint64_t range_start
        uint64_t range_end
        int zero_copy
        int no_warm

    struct vf_counters:
        uint64_t total
        uint64_t read
        uint64_t written
        uint64_t zeroed
        uint64_t skipped
        uint64_t done_below

    struct vf_copy:
        pass

    vf_copy *vf_copy_open(const vf_copy_config *cfg, vf_error *err)
    int vf_copy_run(vf_copy *c, vf_error *err)
    void vf_copy_cancel(vf_copy *c)
    void vf_copy_counters(vf_copy *c, vf_counters *out)
    unsigned vf_copy_connections(const vf_copy *c)
    int vf_copy_zero_copy(const vf_copy *c)
    const char *vf_copy_zero_copy_note(const vf_copy *c)
    void vf_copy_close(vf_copy *c)

    struct vf_endpoint:
        pass

    vf_endpoint *vf_endpoint_open(const char *uri, int writable, vf_error *err)
    int64_t vf_endpoint_size(vf_endpoint *ep)
    int vf_endpoint_pread(vf_endpoint *ep, void *buf, size_t count, uint64_t offset,
                          vf_error *err)
    int vf_endpoint_pwrite(vf_endpoint *ep, const void *buf, size_t count,
                           uint64_t offset, vf_error *err)
    int vf_endpoint_zero(vf_endpoint *ep, uint64_t count, uint64_t offset, vf_error *err)
    int vf_endpoint_flush(vf_endpoint *ep, vf_error *err)
    void vf_endpoint_warm(vf_endpoint *ep)
    void vf_endpoint_close(vf_endpoint *ep)
    const char *vf_libnbd_version()

    char *VF_RELAY_PREFACE
    int VF_RELAY_PREFACE_LEN
    int VF_RELAY_TOKEN_LEN

    enum vf_relay_role:
        VF_RELAY_CLIENT
        VF_RELAY_SERVER

    struct vf_relay_config:
        int role
        const char *ca_file
        const char *cert_file
        const char *key_file
        const char *address
        unsigned port
        const char *server_name
        unsigned handshake_ms
        unsigned pending_cap

    struct vf_relay_stats:
        uint64_t bytes_up
        uint64_t bytes_down
        uint64_t connections
        uint64_t refused
        uint64_t failed
        uint64_t cpu_ns
        unsigned active
        char last_error[256]

    struct vf_relay:
        pass

    vf_relay *vf_relay_new(const vf_relay_config *cfg, vf_error *err)
    int vf_relay_listen(vf_relay *r, const char *path, const char *token, vf_error *err)
    int vf_relay_route(vf_relay *r, const char *token, const char *path, vf_error *err)
    void vf_relay_unroute(vf_relay *r, const char *token)
    int vf_relay_adopt(vf_relay *r, int fd, unsigned timeout_ms, vf_error *err)
    int vf_relay_run(vf_relay *r, vf_error *err)
    void vf_relay_stop(vf_relay *r)
    void vf_relay_get_stats(vf_relay *r, vf_relay_stats *out)
    void vf_relay_free(vf_relay *r)
