"""Automatic certificates' configuration: relay options and TOML keys -> :class:`AcmeConfig`.

Options (``kite relay``) and keys (relay TOML), each option overriding its key:

* ``--acme URL`` / ``acme``: the ACME directory to order from (needs --dns and --zone, unless
  only on-demand certificates are wanted);
* ``--acme-email ADDR`` / ``acme_email``: the ACME account's contact address;
* ``--acme-ca PEM`` / ``acme_ca``: CA file that verifies the ACME server's HTTPS (default:
  the system's; a test CA such as Pebble's needs it);
* ``--state-dir DIR`` / ``state_dir``: where the relay keeps its state: ACME account,
  certificates (default: the folder of --db, else $XDG_STATE_HOME/kite, i.e.
  ~/.local/state/kite);
* ``--acme-on-demand`` / ``acme_on_demand``: also certificates for kite names outside the
  zone, through HTTP-01 when visited (:mod:`kite.certs.ondemand`); off by default; without
  --dns/--zone the only kind ordered;
* ``--acme-on-demand-per-hour N`` / ``acme_on_demand_per_hour``: at most N on-demand orders
  begin per hour (default 10, 1-1000).
"""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlsplit

from ..errors import ConfigError
from .ondemand import MAX_PER_HOUR, PER_HOUR

__all__ = ["AcmeConfig", "ACME_KEYS", "LETS_ENCRYPT", "build_acme_config", "default_state_dir"]

#: The relay TOML keys this module reads.
ACME_KEYS = frozenset({"acme", "acme_email", "acme_ca", "state_dir", "acme_on_demand",
                       "acme_on_demand_per_hour"})
#: Let's Encrypt's production directory (its staging one: acme-staging-v02.api.letsencrypt.org).
LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"

_EMAIL = re.compile(r"[^@\s:/]+@[^@\s:/]+\.[^@\s:/]+")


@dataclass(frozen=True)
class AcmeConfig:
    directory: str  # the ACME directory URL (https)
    email: str  # the account's contact
    zone: Optional[str]  # the certificate covers zone and *.zone; None: on demand only
    state_dir: str  # the relay's state directory (created 0700)
    ca_file: Optional[str] = None  # verifies the ACME server's HTTPS; None: the system's CAs
    on_demand: bool = False  # also HTTP-01 certificates for kite names outside the zone
    on_demand_per_hour: int = PER_HOUR  # at most this many on-demand orders begin per hour


def default_state_dir(db: Optional[str] = None) -> str:
    """The folder of the registry file ``db``, else ``$XDG_STATE_HOME/kite`` (default
    ``~/.local/state/kite``)."""
    if db and "://" not in db:  # a registry file, not a Redis URL
        return os.path.dirname(os.path.abspath(db))
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "kite")


def _pick(cli: dict, data: dict, key: str) -> Any:
    v = cli.get(key)
    return data.get(key) if v is None else v


def build_acme_config(data: dict, cli: Optional[dict], *, zone: Optional[str], dns_served: bool,
                      db: Optional[str] = None) -> Optional[AcmeConfig]:
    """ACME settings from the relay TOML ``data`` and the options ``cli`` (click's names:
    acme, acme_email, acme_ca, state_dir); None when ACME is not asked for.  ``zone`` and
    ``dns_served`` come from the name service's settings: the relay answers DNS-01 itself."""
    cli = cli or {}
    url = _pick(cli, data, "acme")
    on_demand, per_hour = _on_demand(cli, data)
    if not url:
        for key in ("acme_email", "acme_ca", "acme_on_demand", "acme_on_demand_per_hour"):
            if _pick(cli, data, key):
                raise ConfigError(f"--{key.replace('_', '-')}", "only means something with --acme",
                                  f"add --acme DIRECTORY_URL, e.g. {LETS_ENCRYPT}")
        return None
    url = str(url).strip()
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError("--acme", f"{url!r} is not an https:// URL",
                          f"give the ACME directory, e.g. {LETS_ENCRYPT}")
    if not on_demand and (not dns_served or not zone):
        raise ConfigError("--acme", "needs --dns and --zone: the relay answers the DNS-01 "
                          "challenges in its own zone",
                          "add --dns 0.0.0.0:53 --zone ZONE, the zone delegated to this relay, "
                          "or --acme-on-demand for the kites' own names only")
    email = _pick(cli, data, "acme_email")
    if not email or not _EMAIL.fullmatch(str(email).strip()):
        raise ConfigError("--acme-email", f"needs a contact address, got {email!r}",
                          "e.g. --acme-email ops@example.com")
    ca = _pick(cli, data, "acme_ca")
    if ca is not None:
        ca = str(ca)
        try:
            ssl.create_default_context(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("--acme-ca", f"cannot load CA file {ca!r}: {exc}",
                              "give a PEM file with the CA that signed the ACME server's "
                              "certificate") from None
    state = _pick(cli, data, "state_dir")
    if state is not None and (not isinstance(state, str) or not state):
        raise ConfigError("--state-dir", f"expected a folder, got {state!r}", "quote it")
    state_dir = os.path.abspath(os.path.expanduser(state)) if state else default_state_dir(db)
    if os.path.exists(state_dir) and not os.path.isdir(state_dir):
        raise ConfigError("--state-dir", f"{state_dir!r} is not a folder", "give a folder")
    try:
        import acme.client  # noqa: F401  (the extra kite-relay[acme])
        import josepy  # noqa: F401
    except ImportError:
        raise ConfigError("--acme", "the acme package is not installed",
                          "pip install 'kite-relay[acme]'") from None
    return AcmeConfig(directory=url, email=str(email).strip(),
                      zone=zone if dns_served and zone else None, state_dir=state_dir,
                      ca_file=ca, on_demand=on_demand, on_demand_per_hour=per_hour)


def _on_demand(cli: dict, data: dict) -> tuple:
    """(acme_on_demand, acme_on_demand_per_hour), checked."""
    on = _pick(cli, data, "acme_on_demand")
    if on is not None and not isinstance(on, bool):
        raise ConfigError("acme_on_demand", f"expected true or false, got {on!r}",
                          "write acme_on_demand = true (no quotes)")
    per_hour = _pick(cli, data, "acme_on_demand_per_hour")
    if per_hour is not None and (isinstance(per_hour, bool) or not isinstance(per_hour, int)
                                 or not 1 <= per_hour <= MAX_PER_HOUR):
        raise ConfigError("acme_on_demand_per_hour", f"bad value {per_hour!r}",
                          f"a whole number of orders per hour, 1-{MAX_PER_HOUR} "
                          f"(default {PER_HOUR})")
    if per_hour is not None and not on:
        raise ConfigError("acme_on_demand_per_hour", "only means something with "
                          "acme_on_demand", "add --acme-on-demand (acme_on_demand = true)")
    return bool(on), PER_HOUR if per_hour is None else per_hour
