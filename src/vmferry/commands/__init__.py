"""One module per CLI subcommand; each has add_parser(subparsers) and run(args).

Imports inside functions, here and in vmferry/__init__.py, copying.py and
agent/transport.py, are on purpose and for one reason: start-up.  Every
command's parser is built on each run, so a module imported at the top of a
command is paid for by `vmferry --help` and `vmferry list` too; asyncio,
qemu.qmp, the engine and the migration package together cost about 100 ms
(`python -X importtime -c 'import vmferry.cli'` shows it).  Elsewhere a
module imports what it uses at its top, and one that cannot (a cycle) says
why where it imports.
"""
