"""kite's sans-IO PageKite protocol layer: bytes and header lists in, events and bytes out.

Nothing here imports asyncio or touches a socket (docs/protocol.md is the reference).  One
module per wire format; import them by name (``from kite.proto import handshake``):

* :mod:`.names` - kite protocols, domains, wildcards (§2.1, §8.1);
* :mod:`.http` - HTTP heads, CONNECT requests and replies, the relay's refusal pages;
* :mod:`.signing` - signatures, challenges and salts (§3);
* :mod:`.handshake` - the ping probe, the tunnel request and reply, kite lines, the relay's
  authorisation decision, in-band registration (§1.3, §2);
* :mod:`.control` - control chunks (PING/PONG, SKB, EOF, ZRST, stream open) and the chunk
  parser that turns non-data chunks into events (§4.3, §5, §6);
* :mod:`.flow` - per-stream windows and acknowledgements (§5.5);
* :mod:`.framebudget` - how kite paces small chunks towards pagekite.py (§4.1, §13.9);
* :mod:`.zchunks` - the ZChunk inflater, the Demux's (§4.4);
* :mod:`.sniff` - what a visitor's first bytes are: ping, tunnel, CONNECT, HTTP, TLS (§8.1);
* :mod:`.forwarded` - the backend's X-Forwarded-* rewriting of HTTP request heads (§8.3);
* :mod:`.proxyproto` - PROXY protocol v1/v2 headers for raw and https kites.
"""
