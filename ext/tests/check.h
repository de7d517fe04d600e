/* What the C test programs share: CHECK counts a failure, says where and
 * why, and lets the test go on, so one run reports every broken check. */
#ifndef VMFERRY_TESTS_CHECK_H
#define VMFERRY_TESTS_CHECK_H

#include <stdio.h>
#include <stdlib.h>

static int failures;

#define CHECK(cond, ...) do {                                   \
    if (!(cond)) {                                              \
      fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      fprintf(stderr, __VA_ARGS__);                             \
      fputc('\n', stderr);                                      \
      failures++;                                               \
    }                                                           \
  } while (0)

/* The end of a test program: its scratch folder goes, and the exit status
 * says whether every check held. */
static inline int
finish(const char *scratch)
{
  char cmd[300];
  snprintf(cmd, sizeof cmd, "rm -rf %s", scratch);
  if (system(cmd) != 0)
    fprintf(stderr, "could not remove %s\n", scratch);
  if (failures)
    fprintf(stderr, "%d check(s) failed\n", failures);
  return failures ? 1 : 0;
}

#endif
