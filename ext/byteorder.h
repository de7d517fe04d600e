/* Big-endian (network order) fields of the NBD protocol: the zero-copy lanes
 * (nbd_raw.c) and the fake server of their tests read and write them. */
#ifndef VMFERRY_BYTEORDER_H
#define VMFERRY_BYTEORDER_H

#include <stdint.h>

static inline void
put16(unsigned char *p, uint16_t v) { p[0] = v >> 8; p[1] = v; }
static inline void
put32(unsigned char *p, uint32_t v) { put16(p, v >> 16); put16(p + 2, v); }
static inline void
put64(unsigned char *p, uint64_t v) { put32(p, v >> 32); put32(p + 4, v); }
static inline uint16_t
get16(const unsigned char *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t
get32(const unsigned char *p) { return (uint32_t)get16(p) << 16 | get16(p + 2); }
static inline uint64_t
get64(const unsigned char *p) { return (uint64_t)get32(p) << 32 | get32(p + 4); }

#endif
