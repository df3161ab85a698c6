"""The name service: DNS for the kites of a relay (the service layer, between the roles and
kite.net: it may import kite.net, kite.proto, kite.config and kite.errors, never a role).

``zone`` (which names exist, the answers, dnspython), ``server`` (UDP and TCP, rate limit,
answer cache), ``negative`` (NXDOMAIN and REFUSED from templates, without dnspython),
``update`` (RFC 2136 push), ``config`` (options and keys), ``service``
(:class:`NameService`, what the relay builds and feeds with presence events).
"""

from .config import NamesConfig, build_names_config
from .service import NameService

__all__ = ["NameService", "NamesConfig", "build_names_config"]
