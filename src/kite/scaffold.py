"""Starter files for ``kite init relay|backend``: a config, a certificate and a secret.

Each function writes its files (never over existing ones unless ``force``) and returns the
lines to show the user: what was written, and for a relay the certificate's fingerprint.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets

from .errors import ConfigError
from .net.tls import generate_self_signed
from .proto.names import valid_domain

__all__ = ["init_relay", "init_backend"]


def _write(path: str, text: str, force: bool, mode: int = 0o644) -> None:
    if os.path.exists(path) and not force:
        raise ConfigError(path, "already exists", "pass --force to overwrite, or use another --dir")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _toml_str(text: str) -> str:
    """A TOML basic string (JSON escapes are valid TOML; TOML also wants DEL escaped)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _check_names(names: list) -> list:
    """Certificate names: DNS names (``*.parent`` allowed) or IP addresses."""
    out = []
    for name in names:
        n = name.strip().lower().rstrip(".")
        if not valid_domain(n):
            try:
                n = str(ipaddress.ip_address(n))
            except ValueError:
                raise ConfigError("--name", f"bad relay name {name!r}",
                                  "give a DNS name or an IP address, e.g. relay.example.com") from None
        out.append(n)
    return out


def _mkdir(directory: str) -> None:
    if not directory.isprintable():  # it is written into the config's first comment line
        raise ConfigError("--dir", f"bad directory name {directory!r}",
                          "use a name without control characters")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise ConfigError("--dir", f"cannot create {directory!r}: {exc.strerror or exc}",
                          "give a directory you can write to") from None


def init_relay(directory: str, *, names: list, domain: str, force: bool) -> list:
    names = _check_names(names) or ["localhost", "127.0.0.1"]
    kite_domain = domain.strip().lower().rstrip(".")
    if not valid_domain(kite_domain):
        raise ConfigError("--domain", f"bad kite domain {domain!r}",
                          "give a DNS name or *.parent, e.g. *.example.com")
    _mkdir(directory)
    cert = os.path.join(directory, "relay.crt")
    key = os.path.join(directory, "relay.key")
    conf = os.path.join(directory, "relay.toml")
    for p in (cert, key, conf):
        if os.path.exists(p) and not force:
            raise ConfigError(p, "already exists", "pass --force to overwrite, or use another --dir")
    pin = generate_self_signed(cert, key, names)
    secret = secrets.token_urlsafe(24).replace("-", "x").replace("_", "y")
    _write(conf, f'''# kite relay configuration (kite relay --config {conf})
listen = ["0.0.0.0:443"]
tls_cert = {_toml_str(os.path.abspath(cert))}
tls_key = {_toml_str(os.path.abspath(key))}

[[kite]]
domain = {_toml_str(kite_domain)}
protos = "*"
secret = "{secret}"
''', force, 0o600)
    return [
        f"wrote {cert}, {key} and {conf} (it holds the secret; mode 0600)",
        f"relay certificate SHA-256 fingerprint: {pin}",
        "backends verify it with:  --ca relay.crt   or   --fingerprint " + pin,
    ]


def init_backend(directory: str, *, force: bool) -> list:
    _mkdir(directory)
    conf = os.path.join(directory, "backend.toml")
    secret = secrets.token_urlsafe(24).replace("-", "x").replace("_", "y")
    _write(conf, f'''# kite backend configuration (kite expose --config {conf})
[defaults]
secret = "{secret}"      # the relay must allow it: --kite '*:app.example.com:<secret>'
# ca = "relay.crt"       # verify the relay; or fingerprint = "..."; or insecure = true

[[relay]]
address = "relay.example.com:443"

[[kite]]
name = "app.example.com"
target = "http://127.0.0.1:8080"
''', force, 0o600)
    return [f"wrote {conf} (it holds a new secret; mode 0600): edit the relay address and kites"]
