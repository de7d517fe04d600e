/* Error reporting: the engine fills a caller-owned struct vf_error and
 * returns -1 or NULL.  The first error wins, so the root cause survives
 * the cascade of failures that usually follows it (a dead server fails
 * every in-flight request). */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

int
vf_set_error(struct vf_error *err, int kind, int errnum, const char *fmt, ...)
{
  va_list ap;

  if (err == NULL || err->kind != VF_ERR_NONE)
    return -1;
  err->kind = kind;
  err->errnum = errnum;
  va_start(ap, fmt);
  vsnprintf(err->msg, sizeof err->msg, fmt, ap);
  va_end(ap);
  return -1;
}
