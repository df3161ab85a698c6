"""The shared asyncio layer: tunnels and streams (:mod:`.tunnel`), dialing a relay
(:mod:`.dial`), TLS contexts and pinning (:mod:`.tls`), byte pipes between transports and
file descriptors (:mod:`.pipes`), socket options (:mod:`.sockets`), the event loop
(:mod:`.aio`).

Relay, backend and client build on it; it builds on :mod:`kite.proto` and the fast path and
never imports a role.
"""
