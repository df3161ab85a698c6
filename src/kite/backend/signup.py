"""``kite expose --signup EMAIL``: sign up on the relay, keep the secret for the next run.

The request goes to the relay's own name over the same checked TLS as a tunnel (``--ca``,
``--fingerprint`` or ``--insecure``; kite.net.dial).  The secret is saved in
:func:`secrets_path` (``$KITE_SECRETS``, else ``~/.config/kite/secrets.json``), a JSON
object kite name -> secret written mode 0600 in a 0700 folder; ``kite expose`` without
``--secret`` takes the saved one for its NAME.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Optional

from ..config import RelaySpec
from ..errors import SignupFailed
from ..net.dial import dial
from ..net.tls import ClientTLS

__all__ = ["signup", "secrets_path", "save_secret", "saved_secret"]

#: The most of the relay's answer read.
MAX_REPLY = 65536


def secrets_path() -> Path:
    env = os.environ.get("KITE_SECRETS")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(Path.home(), ".config")
    return Path(base) / "kite" / "secrets.json"


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def saved_secret(name: str) -> Optional[str]:
    value = _load(secrets_path()).get(name.lower())
    return value if isinstance(value, str) else None


def save_secret(name: str, secret: str) -> Path:
    """Add ``name``'s secret to the secrets file (mode 0600, replaced atomically)."""
    path = secrets_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = _load(path)
    data[name.lower()] = secret
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
    return path


class _Reply(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data
        if len(self.data) > MAX_REPLY and not self.done.done():
            self.done.set_exception(SignupFailed("the relay's answer is too long"))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if not self.done.done():
            self.done.set_result(bytes(self.data))


async def signup(relay: RelaySpec, email: str, kite: str, timeout: float = 20.0) -> dict:
    """POST /api/signup to ``relay``; returns its answer ``{secret, kite, quota_bytes}``."""
    tls = None if relay.plain else ClientTLS(ca=relay.ca, fingerprint=relay.fingerprint,
                                             insecure=relay.insecure,
                                             server_name=relay.server_name)
    try:
        transport, reply = await dial(relay.host, relay.port, _Reply, tls=tls,
                                      connect_name=relay.connect_name if tls else None,
                                      timeout=timeout)
        body = json.dumps({"email": email, "kite": kite}).encode()
        host = (relay.server_name or relay.host).encode()
        transport.write(b"POST /api/signup HTTP/1.1\r\nHost: %s\r\nContent-Type: "
                        b"application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                        % (host, len(body)) + body)
        data = await asyncio.wait_for(reply.done, timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        raise SignupFailed(f"cannot ask {relay.address} for a sign-up: "
                           f"{exc or type(exc).__name__}") from None
    head, _, text = data.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1:2]
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        first = head.split(b"\r\n")[0].decode(errors="replace")
        raise SignupFailed(f"{relay.address} does not offer sign-up ({first!r})")
    if status != [b"200"] or not isinstance(answer.get("secret"), str):
        raise SignupFailed(f"{relay.address} refused the sign-up: "
                           f"{answer.get('error', 'no reason given')}")
    return answer
