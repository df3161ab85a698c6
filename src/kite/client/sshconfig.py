"""``kite ssh-config``: the ``~/.ssh/config`` block that reaches a raw kite through a relay."""

from __future__ import annotations

import os
import shlex
import sys
from typing import Sequence, Union

from ..errors import ConfigError

__all__ = ["ssh_config_block", "running_kite_command"]


def running_kite_command() -> list[str]:
    """The command that runs this very kite from any directory and any PATH: the absolute
    path of the ``kite`` script, or ``PYTHON -m kite`` when started as ``python -m kite``
    (ssh runs ProxyCommand with the user's PATH, where another kite, or none, may be)."""
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0 and os.path.basename(argv0) not in ("__main__.py", "-c", "-m") \
            and not argv0.endswith(".py"):
        path = os.path.abspath(argv0)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return [path]
    return [sys.executable or "python3", "-m", "kite"]


def ssh_config_block(name: str, relay: str, *, port: int = 22, user: str | None = None,
                     tls_args: tuple = (),
                     command: Union[str, Sequence[str]] = "kite") -> str:
    """The ``~/.ssh/config`` block that reaches raw kite ``name`` through ``relay``.

    ssh runs ProxyCommand through the user's shell, so every argument is shell-quoted;
    ``command`` is the program (a list for several words, e.g. ``python3 -m kite``).
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
    program = [command] if isinstance(command, str) else list(command)
    args = [*program, "connect", "%h", "%p", "--relay", relay, *tls_args]
    proxy = " ".join(a if a in ("%h", "%p") else shlex.quote(a) for a in args)
    lines = [f"Host {name}", f"    HostName {name}", f"    Port {port}"]
    if user:
        lines.append(f"    User {user}")
    lines.append(f"    ProxyCommand {proxy}")
    return "\n".join(lines) + "\n"
