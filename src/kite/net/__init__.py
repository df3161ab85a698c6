"""The asyncio layer shared by the relay, the backend and the client: dialing a relay
(:mod:`.dial`), TLS contexts and pinning (:mod:`.tls`), byte pipes between transports and
file descriptors (:mod:`.pipes`)."""
