"""What the admin endpoint shows, read from the relay's state when asked (never counted on
the per-chunk path): the status document of ``/api/status`` and the Prometheus metric
families of ``/metrics``.

Bytes come from the access log's totals (streams that ended) plus the slot counters of the
open streams, both keyed by the name the visitor asked for; a visitor of a wildcard kite
counts towards that kite.  Label cardinality is bounded: the ``top`` kites and accounts by
bytes get their own label, the rest are summed under ``other``.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Optional

from .. import __version__
from ..proto.names import domain_candidates

__all__ = ["RelayView", "RelayCollector", "TOP_N", "MAX_VISITORS"]

#: Kites and accounts with a label of their own in /metrics; the rest are ``other``.
TOP_N = 50
#: Live visitors listed in /api/status (the longest-running first).
MAX_VISITORS = 200
#: The label of everything beyond the top N.
OTHER = "other"


def _cert_file_expiry(path: Optional[str]) -> dict[str, float]:
    """``{subject names: notAfter}`` of the certificate in ``path`` (empty if none)."""
    if not path:
        return {}
    try:
        from cryptography import x509

        with open(path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError):
        return {}
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    after = getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after
    return {",".join(names) or path: after.timestamp()}


class RelayView:
    """Reads one relay (:class:`~kite.relay.server.RelayServer`) into status and metrics.

    ``cert_expiries``: ``{certificate name: notAfter Unix time}`` for the
    ``kite_certificate_expiry_timestamp_seconds`` metric; by default the relay's
    ``--tls-cert``.
    """

    def __init__(self, server, *, top: int = TOP_N,
                 cert_expiries: Optional[Callable[[], dict[str, float]]] = None) -> None:
        self.server = server
        self.state = server.state
        self.top = top
        if cert_expiries is None:
            cached = _cert_file_expiry(server.config.tls_cert)
            cert_expiries = cached.copy
        self.cert_expiries = cert_expiries

    # -- bytes ----------------------------------------------------------------------------------
    def kite_of(self, host: str, online: set) -> str:
        """The flying kite domain that serves ``host`` (itself if none flies now)."""
        for cand in domain_candidates(host):
            if cand in online:
                return cand
        return host

    def traffic(self) -> tuple[dict, dict, int]:
        """``({kite: [in, out]}, {kite: open streams}, open streams)``: ended streams'
        totals plus the open streams' counters now."""
        log = self.state.access_log
        online = {d for _p, d in self.state.routes.kites()}
        out: dict[str, list[int]] = {}
        active: dict[str, int] = {}
        n = 0
        if log is not None:
            for host, (bin_, bout) in log.bytes.items():
                b = out.setdefault(self.kite_of(host, online), [0, 0])
                b[0] += bin_
                b[1] += bout
            for stream, _rec, bin_, bout in log.live():
                kite = self.kite_of(stream.host, online)
                b = out.setdefault(kite, [0, 0])
                b[0] += bin_
                b[1] += bout
                active[kite] = active.get(kite, 0) + 1
                n += 1
        else:
            for t in list(self.state.tunnels):
                for stream in list(t.streams.values()):
                    kite = self.kite_of(stream.host, online)
                    active[kite] = active.get(kite, 0) + 1
                    n += 1
        return out, active, n

    def accounts(self) -> list[dict]:
        """Each account of the registry: email, bytes used in its period, quota left."""
        registry = self.state.registry
        if registry is None:
            return []
        kites_of: dict[int, list[str]] = {}
        for kite in registry.snap.kites.values():
            kites_of.setdefault(kite.account_id, []).append(kite.name)
        out = []
        for aid, acct in registry.snap.accounts.items():
            left = registry.left(acct)
            used = acct.period_bytes + (acct.quota_bytes - left)
            out.append({"email": acct.email, "quota_left": max(left, 0), "used": used,
                        "quota": used + max(left, 0), "blocked": registry.blocked.get(aid),
                        "kites": sorted(kites_of.get(aid, []))})
        out.sort(key=lambda a: -a["used"])
        return out

    # -- /api/status ----------------------------------------------------------------------------
    def status(self) -> dict:
        state = self.state
        now = time.time()
        traffic, active, n_active = self.traffic()
        owners = self._owners()
        tunnels = []
        for t in sorted(state.tunnels, key=lambda t: getattr(t, "opened_at", 0)):
            if not t.kites:
                continue
            tunnels.append({"peer": t.peer, "tls": t.tls, "since": getattr(t, "opened_at", None),
                            "kites": [f"{p}:{d}" for p, d in t.kites], "streams": len(t.streams)})
        kites = []
        for proto, domain in state.routes.kites():
            b = traffic.get(domain, [0, 0])
            kites.append({"kite": f"{proto}:{domain}", "proto": proto, "domain": domain,
                          "tunnels": len(state.routes.tunnels(proto, domain)),
                          "streams": active.get(domain, 0), "bytes_in": b[0], "bytes_out": b[1],
                          "account": owners.get(domain)})
        visitors = []
        log = state.access_log
        if log is not None:
            for stream, rec, bin_, bout in log.live()[:MAX_VISITORS]:
                visitors.append({"kite": stream.host, "proto": rec.proto, "visitor": rec.visitor,
                                 "method": rec.method, "path": rec.path, "since": rec.time,
                                 "bytes_in": bin_, "bytes_out": bout})
        total = sum(log.totals.values()) if log is not None else None
        return {
            "version": __version__, "started": state.started, "uptime": now - state.started,
            "tunnels": tunnels, "kites": kites, "visitors": visitors,
            "streams": {"active": n_active, "total": total},
            "accounts": self.accounts(), "handshakes": dict(state.handshakes),
        }

    def _owners(self) -> dict[str, str]:
        registry = self.state.registry
        if registry is None:
            return {}
        out = {}
        for name, kite in registry.snap.kites.items():
            acct = registry.snap.accounts.get(kite.account_id)
            if acct is not None:
                out[name] = acct.email
        return out

    def dns_rcodes(self) -> dict[int, int]:
        names = getattr(self.server, "names", None)
        server = getattr(names, "server", None) if names is not None else None
        return dict(getattr(server, "rcodes", {}) or {})


def _top(values: dict[str, float], n: int) -> set[str]:
    """The ``n`` keys with the largest values."""
    return set(sorted(values, key=lambda k: -values[k])[:n])


class RelayCollector:
    """A prometheus_client collector reading a :class:`RelayView` at scrape time."""

    def __init__(self, view: RelayView) -> None:
        self.view = view

    def describe(self) -> Iterable:
        return []  # unchecked collector: the families are known only at scrape time

    def collect(self) -> Iterable:
        from dns.rcode import Rcode
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        view = self.view
        state = view.state
        traffic, active, n_active = view.traffic()
        top = _top({k: b[0] + b[1] for k, b in traffic.items()}, view.top)

        def label(kite: str) -> str:
            return kite if kite in top else OTHER

        yield GaugeMetricFamily("kite_tunnels_up", "Tunnels flying at least one kite.",
                                value=sum(1 for t in list(state.tunnels) if t.kites))
        yield GaugeMetricFamily("kite_kites_online", "Kites (proto:domain) flying now.",
                                value=len(state.routes.kites()))
        g = GaugeMetricFamily("kite_visitor_streams_active", "Open visitor streams by kite.",
                              labels=["kite"])
        grouped: dict[str, float] = {}
        for kite, n in active.items():
            grouped[label(kite)] = grouped.get(label(kite), 0) + n
        for kite, n in sorted(grouped.items()):
            g.add_metric([kite], n)
        yield g
        log = state.access_log
        c = CounterMetricFamily("kite_visitor_streams", "Visitor streams ended (and visitors "
                                "refused) by kite, protocol and result.",
                                labels=["kite", "proto", "result"])
        if log is not None:
            online = {d for _p, d in state.routes.kites()}
            totals: dict[tuple, float] = {}
            for (host, proto, result), n in list(log.totals.items()):
                key = (label(view.kite_of(host, online)), proto or "-", result)
                totals[key] = totals.get(key, 0) + n
            for key, n in sorted(totals.items()):
                c.add_metric(list(key), n)
        yield c
        by_kite = CounterMetricFamily("kite_visitor_bytes", "Bytes from (in) and to (out) "
                                      "visitors by kite.", labels=["kite", "direction"])
        sums: dict[str, list[int]] = {}
        for kite, (bin_, bout) in traffic.items():
            s = sums.setdefault(label(kite), [0, 0])
            s[0] += bin_
            s[1] += bout
        for kite, (bin_, bout) in sorted(sums.items()):
            by_kite.add_metric([kite, "in"], bin_)
            by_kite.add_metric([kite, "out"], bout)
        yield by_kite
        yield from self._accounts(traffic)
        h = CounterMetricFamily("kite_handshakes", "Kite requests of tunnels by result (ok, "
                                "or the refusal reason).", labels=["result"])
        for result, n in sorted(state.handshakes.items()):
            h.add_metric([result], n)
        yield h
        d = CounterMetricFamily("kite_dns_queries", "DNS answers sent by rcode.",
                                labels=["rcode"])
        for rcode, n in sorted(view.dns_rcodes().items()):
            try:
                name = Rcode(rcode).name
            except ValueError:
                name = str(rcode)
            d.add_metric([name], n)
        yield d
        e = GaugeMetricFamily("kite_certificate_expiry_timestamp_seconds",
                              "When each certificate expires (Unix time).", labels=["name"])
        for name, when in sorted(view.cert_expiries().items()):
            e.add_metric([name], when)
        yield e
        fleet = state.fleet_link
        if fleet is not None:
            f = CounterMetricFamily("kite_fleet_handovers", "Visitors handed to the relay that "
                                    "flies their kite, by that relay's address.",
                                    labels=["relay"])
            for relay, n in sorted(fleet.forwarded.items()):
                f.add_metric([relay], n)
            yield f
        yield from self._connections()
        yield GaugeMetricFamily("kite_start_time_seconds", "When the relay started (Unix time).",
                                value=state.started)

    def _connections(self) -> Iterable:
        """Connections held by state, the limits on them, and what the limits turned away
        (kite.relay.accept; docs/security.md)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        acceptor = getattr(self.view.server, "acceptor", None)
        if acceptor is None:
            return
        state = self.view.state
        g = GaugeMetricFamily("kite_connections", "Connections the relay holds, by state "
                              "(pending: first bytes awaited; setting_up: TLS handshakes and "
                              "hand-overs).", labels=["state"])
        g.add_metric(["pending"], len(acceptor.pending))
        g.add_metric(["setting_up"], acceptor.dispatcher.setting_up())
        g.add_metric(["tunnel"], len(state.tunnels))
        g.add_metric(["visitor"], state.limits.connections)
        yield g
        lim = GaugeMetricFamily("kite_connection_limit", "The connection limits in force "
                                "(--max-connections, --max-pending, --tunnel-reserve).",
                                labels=["limit"])
        lim.add_metric(["max_connections"], acceptor.max_connections)
        lim.add_metric(["max_pending"], acceptor.max_pending)
        lim.add_metric(["tunnel_reserve"], acceptor.tunnel_reserve)
        yield lim
        c = CounterMetricFamily("kite_connections_turned_away", "Connections closed by a "
                                "limit: reset over max_connections or over the pending "
                                "connections one address may have, visitors refused for the "
                                "tunnel reserve, silent past the first-bytes timeout, pending "
                                "ones reset for a new one while max_pending were pending.",
                                labels=["reason"])
        c.add_metric(["max_connections"], acceptor.dropped_total)
        c.add_metric(["pending_per_address"], acceptor.address_total)
        c.add_metric(["tunnel_reserve"], acceptor.full_total)
        c.add_metric(["silent"], acceptor.silent_total)
        c.add_metric(["evicted"], acceptor.evicted_total)
        yield c

    def _accounts(self, traffic: dict) -> Iterable:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        view = self.view
        registry = view.state.registry
        b = CounterMetricFamily("kite_account_bytes", "Bytes from (in) and to (out) visitors "
                                "by account.", labels=["account", "direction"])
        q = GaugeMetricFamily("kite_account_quota_left_bytes", "Data quota left by account.",
                              labels=["account"])
        if registry is not None:
            per: dict[str, list[int]] = {}
            for kite, (bin_, bout) in traffic.items():
                _k, acct = registry.owner(kite)
                if acct is not None:
                    s = per.setdefault(acct.email, [0, 0])
                    s[0] += bin_
                    s[1] += bout
            accounts = view.accounts()
            top = {a["email"] for a in accounts[:view.top]}
            sums: dict[str, list[int]] = {}
            for email, (bin_, bout) in per.items():
                s = sums.setdefault(email if email in top else OTHER, [0, 0])
                s[0] += bin_
                s[1] += bout
            for email, (bin_, bout) in sorted(sums.items()):
                b.add_metric([email, "in"], bin_)
                b.add_metric([email, "out"], bout)
            for a in accounts[:view.top]:
                q.add_metric([a["email"]], a["quota_left"])
        yield b
        yield q
