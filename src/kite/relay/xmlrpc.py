"""pagekite.py's own sign-up, answered by the relay: XML-RPC at ``POST /xmlrpc/``.

``pagekite.py --signup --service_xmlrpc=https://RELAY/xmlrpc/`` talks to pagekite.net's
service API; with ``kite relay --signup ZONE`` the relay answers the calls its sign-up
wizard makes (PyPagekite ``pk.py``, ``RegisterNewKite``), on its own name like
``POST /api/signup``:

* ``getAvailableDomains(a, b)`` -> ``[".ZONE"]``;
* ``signUp(email, kitename)`` -> ``{"secret": .., "timeout": minutes}`` (a new account
  with the starter quota and that kite; kite accounts need no activation, so ``timeout``,
  which pagekite.py shows as the minutes an unactivated account lives, is a year), or
  ``{"error": code}`` with pagekite's codes: ``pleaselogin`` (the account exists),
  ``email``, ``domain`` (not a name in the zone), ``domaintaken``, ``ratelimit``,
  ``unavailable``;
* ``getSharedSecret(email, password)`` -> the account's secret when ``password`` *is*
  that secret (kite accounts have no passwords; this is how pagekite.py "logs on" to add
  kites), else a Fault that says nothing about whether the account exists;
* ``addKite(email, secret, kitename)`` -> ``{}`` or ``{"error": code}``: one more kite in
  the zone for that account.

Sign-ups and added kites share the per-address hourly limit of ``POST /api/signup``.
Messages are read with :func:`xmlrpc.client.loads` from at most ``MAX_BODY`` bytes, and
any document type declaration (``<!``, which XML-RPC never needs: entity tricks) is
refused before parsing.
"""

from __future__ import annotations

import hmac
import logging
import time
import xmlrpc.client
from typing import Any

from ..errors import StoreError
from ..store import DEFAULT_PROTOS, check_email, check_name

log = logging.getLogger("kite.relay")

__all__ = ["XmlRpcService", "XMLRPC_PATHS"]

#: Where the relay answers XML-RPC (pagekite.net's service URL ends in /xmlrpc/).
XMLRPC_PATHS = (b"/xmlrpc", b"/xmlrpc/")
#: pagekite.py shows it as the minutes an unactivated account lives; kite's never lapse.
TIMEOUT_MINUTES = 365 * 24 * 60
_FAULT_LOGIN = 1
_FAULT_CALL = 2


class XmlRpcService:
    """The XML-RPC methods, on top of a :class:`~kite.relay.signup.SignupService`."""

    def __init__(self, signup) -> None:
        self.signup = signup

    async def answer(self, body: bytes, ip: str) -> bytes:
        """The XML-RPC response document for request ``body``."""
        if b"<!" in body:
            return _fault(_FAULT_CALL, "document type declarations are not accepted")
        try:
            params, method = xmlrpc.client.loads(body)
        except Exception:  # expat and xmlrpc raise many kinds on bad input
            return _fault(_FAULT_CALL, "malformed XML-RPC request")
        if not all(isinstance(p, str) for p in params):
            return _fault(_FAULT_CALL, "parameters must be strings")
        methods: dict[str, tuple[Any, int]] = {
            "getAvailableDomains": (self.get_available_domains, 2),
            "signUp": (self.sign_up, 2),
            "getSharedSecret": (self.get_shared_secret, 2),
            "addKite": (self.add_kite, 3)}
        call = methods.get(method or "")
        if call is None:
            return _fault(_FAULT_CALL, f"unknown method {str(method)[:64]!r}")
        fn, nargs = call
        if len(params) != nargs:
            return _fault(_FAULT_CALL, f"{method} takes {nargs} arguments")
        try:
            result = await fn(ip, *params)
        except xmlrpc.client.Fault as fault:
            return _fault(fault.faultCode, fault.faultString)
        return xmlrpc.client.dumps((result,), methodresponse=True).encode()

    # -- methods ----------------------------------------------------------------------------
    async def get_available_domains(self, ip: str, _a: str, _b: str) -> list:
        return [f".{self.signup.zone}"]

    async def sign_up(self, ip: str, email: str, kitename: str) -> dict:
        svc = self.signup
        try:
            email = check_email(email)
        except StoreError:
            return {"error": "email"}
        kite = self._zone_name(kitename)
        if kite is None:
            return {"error": "domain"}
        now = time.time()
        if svc._limited(ip, now):
            return {"error": "ratelimit"}
        registry = svc.registry
        if any(a.email == email for a in registry.snap.accounts.values()):
            return {"error": "pleaselogin"}
        try:
            acct = await registry.db_call(registry.store.signup, email, kite, svc.quota,
                                          frozenset(DEFAULT_PROTOS))
        except StoreError as exc:
            return {"error": self._store_error(exc)}
        svc._recent[ip].append(now)
        await registry.reload()  # our own commit does not change data_version for us
        log.info("sign-up (pagekite.py XML-RPC): %s with kite %s from %s", email, kite, ip)
        return {"secret": acct.secret, "timeout": TIMEOUT_MINUTES}

    async def get_shared_secret(self, ip: str, email: str, password: str) -> str:
        acct = self._login(email, password)
        return acct.secret

    async def add_kite(self, ip: str, email: str, secret: str, kitename: str) -> dict:
        svc = self.signup
        acct = self._login(email, secret)
        kite = self._zone_name(kitename)
        if kite is None:
            return {"error": "domain"}
        now = time.time()
        if svc._limited(ip, now):
            return {"error": "ratelimit"}
        registry = svc.registry
        try:
            await registry.db_call(registry.store.set_kite, acct.email, kite,
                                   frozenset(DEFAULT_PROTOS))
        except StoreError as exc:
            return {"error": self._store_error(exc)}
        svc._recent[ip].append(now)
        await registry.reload()
        log.info("kite %s added to %s (pagekite.py XML-RPC) from %s", kite, acct.email, ip)
        return {}

    # -- helpers ----------------------------------------------------------------------------
    def _zone_name(self, kitename: str):
        """``kitename`` if it is one label under the sign-up zone, else None."""
        try:
            kite = check_name(kitename)
        except StoreError:
            return None
        label, _, parent = kite.partition(".")
        return kite if parent == self.signup.zone and label != "*" else None

    def _login(self, email: str, secret: str):
        """The account whose email and secret these are; one Fault for every mismatch."""
        try:
            email = check_email(email)
        except StoreError:
            raise xmlrpc.client.Fault(_FAULT_LOGIN, "login failed") from None
        match = None
        given = secret.encode("utf-8", "surrogatepass")
        for acct in self.signup.registry.snap.accounts.values():
            if acct.email == email:
                if hmac.compare_digest(given, acct.secret.encode()) and match is None:
                    match = acct
        if match is None or match.disabled:
            raise xmlrpc.client.Fault(_FAULT_LOGIN, "login failed")
        return match

    @staticmethod
    def _store_error(exc: StoreError) -> str:
        msg = str(exc)
        if "taken" in msg:
            return "domaintaken"
        if "exists" in msg:
            return "pleaselogin"
        log.warning("pagekite.py sign-up failed: %s", msg)
        return "unavailable"


def _fault(code: int, text: str) -> bytes:
    return xmlrpc.client.dumps(xmlrpc.client.Fault(code, text), methodresponse=True).encode()
