"""The destination agent: `vmferry agent` serves Prepare, Finish and abort
of incoming migrations to a source on another host, over ssh (stdio) or
mutual TLS.  protocol.py is the wire format, server.py the agent, pki.py
the certificate layout, reaper.py the cleanup that outlives a killed agent.
"""
