"""What runs on the destination host: in `vmferry agent` for a source on
another host, or in the migrating process itself for a local:// one.

  incoming.py        Prepare and Finish: the incoming QEMU, its images and
                     records, their rollback, and what recover asks of them
  presync_target.py  a presync's images, the qemu-nbd serving them, and the
                     record beside each image that a later migration checks
  check.py           a dry run of Prepare or a presync: every check, reading only

Everything else in vmferry/migration/ runs on the source host, or on both.
"""
