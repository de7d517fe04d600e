"""vmferry: live-migrate QEMU/KVM VMs and move disk data between NBD servers and files.

    >>> import vmferry
    >>> r = vmferry.copy("nbd+unix:///?socket=/run/src.sock", "/var/tmp/disk.raw")
    >>> r.bytes_written
"""
from vmferry.copying import CopyResult, copy, copy_async
from vmferry.errors import (Cancelled, ConnectError, CopyError, EndpointError, MigrationError,
                            UsageError, VerifyError, VmferryError)
from vmferry._engine import Endpoint

__all__ = [
    "copy", "copy_async", "CopyResult", "Endpoint",
    "VmferryError", "UsageError", "ConnectError", "EndpointError", "CopyError", "VerifyError",
    "Cancelled", "MigrationError",
]
__version__ = "0.1.0"
