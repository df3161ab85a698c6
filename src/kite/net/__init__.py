"""The shared asyncio layer: tunnels and streams, dialing, pipes, TLS, the event loop.

Relay, backend and client build on it; it builds on :mod:`kite.proto` and the fast path and
never imports a role.
"""
