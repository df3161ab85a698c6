"""``kite status``: the relay's ``/api/status`` (``kite relay --admin``) as tables on the
terminal, for people who live in ssh."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import click

from .run import config_errors, fail

__all__ = ["status", "render_status"]

#: Where ``kite relay --admin`` listens when given no address.
DEFAULT_ADMIN = "127.0.0.1:4041"


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover - the loop returns


def _ago(t: float | None, now: float) -> str:
    if not t:
        return "-"
    s = max(0.0, now - t)
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.0f} min"
    if s < 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def _table(title: str, header: list[str], rows: list[list[str]], empty: str) -> list[str]:
    out = [f"{title}:"]
    if not rows:
        return out + [f"  ({empty})", ""]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        out.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return out + [""]


def render_status(s: dict, now: float | None = None) -> str:
    """The tables of ``kite status`` for a ``/api/status`` document."""
    now = time.time() if now is None else now
    streams = s.get("streams", {})
    total = streams.get("total")
    lines = [f"kite relay {s.get('version', '?')}, up {_ago(s.get('started'), now)}: "
             f"{len(s.get('tunnels', []))} tunnels, {len(s.get('kites', []))} kites online, "
             f"{streams.get('active', 0)} visitors now"
             + (f", {total} streams served" if total is not None else ""), ""]
    lines += _table("Kites", ["KITE", "ACCOUNT", "TUNNELS", "VISITORS", "IN", "OUT"],
                    [[k["kite"], k.get("account") or "-", str(k["tunnels"]), str(k["streams"]),
                      _bytes(k["bytes_in"]), _bytes(k["bytes_out"])] for k in s.get("kites", [])],
                    "no kite is flying")
    lines += _table("Tunnels", ["BACKEND", "TLS", "UP", "STREAMS", "KITES"],
                    [[t["peer"], "yes" if t.get("tls") else "no", _ago(t.get("since"), now),
                      str(t["streams"]), " ".join(t["kites"])] for t in s.get("tunnels", [])],
                    "no tunnel")
    lines += _table("Visitors", ["VISITOR", "KITE", "REQUEST", "FOR", "IN", "OUT"],
                    [[v["visitor"], f"{v['proto']}:{v['kite']}",
                      f"{v['method']} {v['path']}" if v.get("method") else "-",
                      _ago(v.get("since"), now), _bytes(v["bytes_in"]), _bytes(v["bytes_out"])]
                     for v in s.get("visitors", [])], "no visitor right now")
    if s.get("accounts"):
        lines += _table("Accounts", ["ACCOUNT", "USED", "LEFT", "STATE", "KITES"],
                        [[a["email"], _bytes(a["used"]), _bytes(a["quota_left"]),
                          a.get("blocked") or "ok", " ".join(a.get("kites", []))]
                         for a in s["accounts"]], "none")
    return "\n".join(lines).rstrip() + "\n"


def fetch_status(admin: str, token: str | None, timeout: float = 10.0) -> dict:
    """GET ``/api/status`` of the admin endpoint at ``admin`` (HOST:PORT); KiteError-free:
    failures exit 1 with one line."""
    from ..config import parse_hostport

    with config_errors():
        host, port = parse_hostport(admin, key="--admin", default_host="127.0.0.1")
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    req = urllib.request.Request(f"http://{where}/api/status")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            fail(f"the admin endpoint at {where} wants a token: give --token-file FILE "
                 "(or --token, KITE_ADMIN_TOKEN)", 1)
        fail(f"the admin endpoint at {where} answered HTTP {exc.code}", 1)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        fail(f"cannot reach the admin endpoint at {where}: {reason} (is the relay running "
             "with --admin?)", 1)
    except ValueError:
        fail(f"{where} is not a kite admin endpoint (its /api/status is not JSON)", 1)


@click.command()
@click.option("--admin", default=DEFAULT_ADMIN, show_default=True, metavar="[HOST:]PORT",
              help="The relay's admin endpoint (kite relay --admin).")
@click.option("--token", envvar="KITE_ADMIN_TOKEN",
              help="Its Bearer token (env KITE_ADMIN_TOKEN; shows in `ps`).")
@click.option("--token-file", type=click.Path(dir_okay=False),
              help="Read the token from FILE (its first line).")
@click.option("--json", "as_json", is_flag=True, help="Print /api/status as it is (JSON).")
def status(admin, token, token_file, as_json):
    """Tunnels, kites, visitors and account usage of a running relay."""
    if token_file and not token:
        from ..config import read_secret_file

        with config_errors():
            token = read_secret_file(token_file, "--token-file")
    doc = fetch_status(admin, token)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(render_status(doc), nl=False)
