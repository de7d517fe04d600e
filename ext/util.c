/* Small helpers for the copy planner: zero detection and extent lists. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

const char vf_zero_buffer[ZERO_BUFFER_SIZE];

/* Compare the buffer with itself shifted by 16 bytes: memcmp is far faster
 * than a byte loop, and random data fails on the first bytes. */
bool
is_zero(const char *p, size_t len)
{
  static const char zero16[16];
  size_t head = len < 16 ? len : 16;

  if (memcmp(p, zero16, head) != 0)
    return false;
  if (len <= 16)
    return true;
  return memcmp(p, p + 16, len - 16) == 0;
}

int
extent_append(struct extent_list *l, uint64_t offset, uint64_t length,
              enum extent_type type)
{
  if (length == 0)
    return 0;
  /* Merge with the previous extent when they continue each other. */
  if (l->len > 0) {
    struct extent *last = &l->v[l->len - 1];
    if (last->type == type && last->offset + last->length == offset) {
      last->length += length;
      return 0;
    }
  }
  if (l->len == l->cap) {
    size_t cap = l->cap ? l->cap * 2 : 64;
    struct extent *v = realloc(l->v, cap * sizeof *v);
    if (v == NULL)
      return -1;
    l->v = v;
    l->cap = cap;
  }
  l->v[l->len++] = (struct extent){ offset, length, type };
  return 0;
}
