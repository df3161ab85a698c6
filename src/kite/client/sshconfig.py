"""``kite ssh-config``: the ``~/.ssh/config`` block that reaches a raw kite through a relay."""

from __future__ import annotations

import shlex

from ..errors import ConfigError

__all__ = ["ssh_config_block"]


def ssh_config_block(name: str, relay: str, *, port: int = 22, user: str | None = None,
                     tls_args: tuple = (), command: str = "kite") -> str:
    """The ``~/.ssh/config`` block that reaches raw kite ``name`` through ``relay``.

    ssh runs ProxyCommand through the user's shell, so every argument is shell-quoted.
    """
    if not name or any(c.isspace() or c in "%*?!\"'\\" for c in name):
        raise ConfigError("NAME", f"bad kite name {name!r}", "give a DNS name like box.example.com")
    # Each value becomes (part of) one line of ~/.ssh/config: no line breaks, no controls.
    if user is not None and (not user or any(c.isspace() or not c.isprintable() for c in user)):
        raise ConfigError("--user", f"bad user name {user!r}", "give a login name without spaces")
    for arg in tls_args:
        if not arg.isprintable():
            raise ConfigError("ssh-config", f"bad option value {arg!r}",
                              "no control characters or line breaks")
    args = [command, "connect", "%h", "%p", "--relay", relay, *tls_args]
    proxy = " ".join(a if a in ("%h", "%p") else shlex.quote(a) for a in args)
    lines = [f"Host {name}", f"    HostName {name}", f"    Port {port}"]
    if user:
        lines.append(f"    User {user}")
    lines.append(f"    ProxyCommand {proxy}")
    return "\n".join(lines) + "\n"
