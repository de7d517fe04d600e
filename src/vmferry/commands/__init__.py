"""One module per CLI subcommand; each has add_parser(subparsers) and run(args).

Imports inside functions, here and in vmferry/__init__.py, copying.py and
agent/transport.py, are on purpose and for one reason: start-up.  A run
imports only its own command's module (cli._MODULES; `--help` imports all),
so a module imported at the top of a command is paid for by every run of it,
`vmferry status` and `vmferry jobinfo` included; asyncio, qemu.qmp, the engine
and the migration package together cost about 100 ms (`python -X importtime
-m vmferry COMMAND ...` shows it).  Elsewhere a
module imports what it uses at its top, and one that cannot (a cycle) says
why where it imports.
"""
