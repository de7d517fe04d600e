"""vmferry's exceptions: one tree, rooted in one class.

    VmferryError               anything vmferry raises on purpose
     +-- UsageError            bad input: malformed URI, wrong sizes, conflicting options
     +-- ConnectError          an endpoint cannot be reached, opened or created
     +-- EndpointError         an endpoint cannot serve the request: too small,
     |                         read-only, or without the requested dirty bitmap
     +-- CopyError             I/O failed during a copy (has .errno)
     +-- VerifyError           --verify found the two sides differ
     +-- Cancelled             the user or the program cancelled the operation
     +-- MigrationError        a migration phase failed (has .phase)

Every error's message is one line saying what failed and what to do.
The original cause, when there is one, is kept as __cause__.
"""
from __future__ import annotations


class VmferryError(Exception):
    """Root of every exception vmferry raises on purpose."""

    #: process exit status the CLI uses for this error
    exit_code: int = 1

    def __init__(self, message: str, *, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class UsageError(VmferryError):
    """The input cannot work: fix the command line, URI or sizes."""

    exit_code = 2


class ConnectError(VmferryError):
    """An endpoint could not be reached or opened."""


class EndpointError(VmferryError):
    """An endpoint was reached but cannot serve the request as asked."""


class CopyError(VmferryError):
    """A read, write, zero or flush failed while data was moving."""


class VerifyError(VmferryError):
    """After a copy, the source and destination do not hold the same bytes."""


class Cancelled(VmferryError):
    """The operation was cancelled (Ctrl-C, abort, or task cancellation)."""

    exit_code = 130


class MigrationError(VmferryError):
    """A migration phase failed.  The message says where the guest is: as a
    rule the source runs it again; SOURCE_PAUSED: the source was left paused,
    because the destination may run it (`vmferry recover` resolves that)."""

    def __init__(self, message: str, *, phase: str = "", errno: int = 0,
                 source_paused: bool = False) -> None:
        super().__init__(message, errno=errno)
        self.phase = phase
        self.source_paused = source_paused
