"""Automatic certificates: ACME DNS-01, answered by the relay's own DNS (or HTTP-01).

:class:`AcmeManager` keeps one certificate for ``ZONE`` and ``*.ZONE`` (RFC 8555) fresh;
with ``challenge="http-01"`` it keeps one for a kite's own name (:mod:`kite.certs.ondemand`
runs one manager per such name: the steps below are the same, step 2 publishes
``name/.well-known/acme-challenge/TOKEN`` and its key authorization instead of TXT values).

Theory of operation.  The event loop schedules; the ``acme`` package (certbot's client,
synchronous) runs in a daemon thread, one blocking step at a time, so a slow CA never
stalls the relay and never holds up its exit.  One order goes like this:

1. (thread) account: the stored key and account URI, else a new key and ``newAccount``;
   a fresh P-256 certificate key and a CSR for the names; ``newOrder``.
2. (loop) every DNS-01 value is published at once through ``publish_txt``: the challenges of
   ``ZONE`` and ``*.ZONE`` share the one name ``_acme-challenge.ZONE``, so both values sit in
   one TXT RRset while the CA looks.
3. (thread) the challenges are answered, the authorizations polled, the order finalized,
   the chain downloaded.
4. (loop) the values are withdrawn, whatever happened; (thread) the chain is checked against
   its key and the names and written with the key (mode 0600, atomically); (loop)
   ``on_certificate(cert_path, key_path)`` is called.

Schedule.  A stored certificate that covers the names and is not past two thirds of its
lifetime is used as it is (no order: Let's Encrypt limits orders); at two thirds it is
renewed.  A failed order is logged in one line and retried after ``retry_first`` seconds
(60), doubling each time up to ``retry_max`` (6 h); meanwhile the old certificate, if any,
is still served.

Files, under ``STATE_DIR/acme/<directory host>-<hash of the directory URL>/`` (folders 0700,
files 0600): ``account.key`` (PEM), ``account.json`` (the account URI and contact),
``cert.pem`` (the full chain) and ``cert.key`` (on-demand certificates: in a folder of their
own, ``cert_dir``; the account is shared).  A new directory URL (staging -> production)
gets its own folder, so nothing of one CA is used with another.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import threading
import time
from typing import Any, Callable, Iterable, Optional, TypeVar
from urllib.parse import urlsplit

from ..errors import AcmeFailed, ConfigError, StoreError

log = logging.getLogger("kite.certs")

__all__ = ["AcmeManager", "StoredCertificate", "load_certificate", "covers", "directory_folder",
           "RENEW_AT", "RETRY_FIRST", "RETRY_MAX"]

T = TypeVar("T")

#: Renew when this fraction of the certificate's lifetime has passed.
RENEW_AT = 2 / 3
#: After a failed order, wait this long before the next one, doubling up to RETRY_MAX.
RETRY_FIRST = 60.0
RETRY_MAX = 6 * 3600.0
#: Look at the clock again at least this often (a suspended host, a stepped clock).
MAX_SLEEP = 3600.0
#: After a new certificate, the next order waits at least this long (a CA whose certificates
#: are due for renewal on arrival must not be asked in a tight loop).
MIN_INTERVAL = 1.0
#: How long one order may take, authorizations and finalization together.
ORDER_DEADLINE = 180.0
#: Timeout of each HTTP request to the CA.
NETWORK_TIMEOUT = 30
#: A reason in the log is cut to this many characters.
MAX_REASON = 300
#: In a fleet, while another relay orders: look at the shared certificate this often.
SHARE_WAIT = 15.0
#: The challenge types a manager can answer (RFC 8555 section 8).
CHALLENGES = ("dns-01", "http-01")

# Managers of one directory share the account (key and URI): one thread at a time reads or
# makes it, so two first orders cannot register two keys.
_ACCOUNT_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class StoredCertificate:
    """A certificate and key on disk, and what the schedule needs to know about them."""

    cert_path: str
    key_path: str
    names: frozenset  # the DNS names of the certificate's SAN, lower case
    not_before: float  # POSIX seconds
    not_after: float
    serial: int

    @property
    def renew_at(self) -> float:
        """The moment two thirds of the lifetime have passed."""
        return self.not_before + RENEW_AT * (self.not_after - self.not_before)

    def until(self) -> str:
        return _when(self.not_after)


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _validity(chain_pem: str) -> tuple:
    """(not_after, not_before) of the first certificate of a PEM chain, or (None, None)."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificates(chain_pem.encode())[0]
    except (ValueError, IndexError):
        return None, None
    return cert.not_valid_after_utc.timestamp(), cert.not_valid_before_utc.timestamp()


def directory_folder(state_dir: str, directory_url: str) -> str:
    """``STATE_DIR/acme/<directory host>-<hash of the URL>``: the account and certificates of
    one ACME directory."""
    host = urlsplit(directory_url).hostname or "acme"
    digest = hashlib.sha256(directory_url.encode()).hexdigest()[:12]
    return os.path.join(state_dir, "acme", f"{host}-{digest}")


def covers(cert_names: Iterable[str], wanted: Iterable[str]) -> bool:
    """Every name of ``wanted`` is literally in ``cert_names`` (``*.zone`` by ``*.zone``)."""
    have = {n.lower() for n in cert_names}
    return all(n.lower() in have for n in wanted)


def load_certificate(cert_path: str, key_path: str) -> Optional[StoredCertificate]:
    """The stored chain and key, or None when either is missing, unreadable, or the key does
    not belong to the certificate (a write cut short)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())  # the leaf comes first
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(serialization.Encoding.DER, spki) != \
            key.public_key().public_bytes(serialization.Encoding.DER, spki):
        return None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = frozenset(n.lower() for n in san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = frozenset()
    return StoredCertificate(cert_path, key_path, names, cert.not_valid_before_utc.timestamp(),
                             cert.not_valid_after_utc.timestamp(), cert.serial_number)


def _write_private(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` mode 0600, atomically (a temporary file, then rename)."""
    tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _reason(exc: BaseException) -> str:
    """One line for the log: what went wrong, without payloads or keys."""
    from acme import errors as acme_errors
    from acme import messages

    if isinstance(exc, messages.Error):
        text = f"{exc.code or exc.typ}: {exc.detail or exc.title or ''}"
    elif isinstance(exc, acme_errors.ValidationError):
        bits = []
        for authzr in exc.failed_authzrs:
            ident = authzr.body.identifier
            name = ("*." if getattr(authzr.body, "wildcard", False) else "") + ident.value
            errs = [c.error for c in authzr.body.challenges if c.error is not None]
            bits.append(f"{name}: " + "; ".join(f"{e.code}: {e.detail}" for e in errs))
        text = "validation failed: " + ", ".join(bits)
    elif isinstance(exc, AcmeFailed):
        text = str(exc)
    else:
        # requests' messages nest the cause; the innermost OSError says it plainly.
        inner: Optional[BaseException] = exc
        seen = 0
        while inner is not None and seen < 10:
            if isinstance(inner, OSError) and inner.strerror:
                break
            nxt = inner.__cause__ or inner.__context__
            if nxt is None and inner.args and isinstance(inner.args[0], BaseException):
                nxt = inner.args[0]
            inner, seen = nxt, seen + 1
        text = f"{type(exc).__name__}: {exc}"
        if isinstance(inner, OSError) and inner.strerror:
            text = f"{type(exc).__name__}: {inner.strerror}"
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON else text[:MAX_REASON - 3] + "..."


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a daemon thread: a hung CA never holds up the relay's exit."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def work() -> None:
        try:
            res: tuple = (True, fn(*args))
        except BaseException as exc:  # handed to the awaiting task
            res = (False, exc)
        try:
            loop.call_soon_threadsafe(settle, *res)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=work, name="kite-acme", daemon=True).start()
    return await fut


@dataclasses.dataclass
class _Challenge:
    name: str  # dns-01: _acme-challenge.ZONE; http-01: NAME/.well-known/acme-challenge/TOKEN
    value: str  # dns-01: the TXT value; http-01: the key authorization
    challb: Any  # acme.messages.ChallengeBody
    response: Any  # its DNS01Response


class AcmeManager:
    """Keeps a certificate for ``names`` from the ACME directory at ``directory_url``.

    ``publish_txt(name, values)`` and ``withdraw_txt(name, values)`` serve and stop serving
    TXT values in the relay's zone (:meth:`kite.names.NameService.publish_txt` semantics:
    values are added to those already there); they are called on the event loop.  With
    ``challenge="http-01"`` they serve and stop serving the key authorization (``values``,
    one) at ``NAME/.well-known/acme-challenge/TOKEN`` (``name``).
    ``on_certificate(cert_path, key_path)`` is called on the event loop with the stored
    certificate at start (when usable) and after each new one.  ``clock`` gives POSIX
    seconds (tests move it).  ``cert_dir``: where ``cert.pem`` and ``cert.key`` go (default:
    the directory's folder, beside the account).  ``allow_order()``, when given, is asked
    before each order: 0 lets it go (and counts it), a positive number of seconds defers it.
    """

    def __init__(self, directory_url: str, email: str, *, state_dir: str, names: Iterable[str],
                 publish_txt: Callable[[str, list], None],
                 withdraw_txt: Callable[[str, list], None],
                 on_certificate: Callable[[str, str], object],
                 ca_file: Optional[str] = None, clock: Callable[[], float] = time.time,
                 retry_first: float = RETRY_FIRST, retry_max: float = RETRY_MAX,
                 share: Any = None, challenge: str = "dns-01", cert_dir: Optional[str] = None,
                 allow_order: Optional[Callable[[], float]] = None) -> None:
        if challenge not in CHALLENGES:
            raise ValueError(f"challenge {challenge!r} is not one of {CHALLENGES}")
        self.challenge = challenge
        self.allow_order = allow_order
        self.directory_url = directory_url
        self.email = email
        self.ca_file = ca_file
        self.names = [n.lower().rstrip(".") for n in names]
        self.publish_txt = publish_txt
        self.withdraw_txt = withdraw_txt
        self.on_certificate = on_certificate
        self.clock = clock
        self.retry_first = retry_first
        self.retry_max = retry_max
        #: A fleet's shared certificate (kite.store.fleetcerts.FleetCertificates): one relay
        #: orders under its lock, the others install what it offers; None: order alone.
        self.share = share
        self._shared_txt: list = []  # (name, values) published fleet-wide right now
        self.state_dir = state_dir
        self.dir = directory_folder(state_dir, directory_url)
        self.account_key_path = os.path.join(self.dir, "account.key")
        self.account_path = os.path.join(self.dir, "account.json")
        self.cert_dir = cert_dir or self.dir
        self.cert_path = os.path.join(self.cert_dir, "cert.pem")
        self.key_path = os.path.join(self.cert_dir, "cert.key")
        self.current: Optional[StoredCertificate] = None  # what is being served
        self.failures = 0  # failed orders in a row
        self.orders = 0  # orders placed by this manager
        self._task: Optional[asyncio.Task] = None
        self._published: list = []  # (name, values) being served right now
        # The acme package logs whole requests and responses at DEBUG (payloads, contacts).
        logging.getLogger("acme").setLevel(logging.WARNING)

    # -- lifecycle ------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the state folders (0700); a folder that cannot be made is a ConfigError."""
        folders = [self.state_dir, os.path.join(self.state_dir, "acme"), self.dir]
        if self.cert_dir != self.dir:
            folders += [os.path.dirname(self.cert_dir), self.cert_dir]
        for d in folders:
            try:
                os.makedirs(d, mode=0o700, exist_ok=True)
            except OSError as exc:
                raise ConfigError("--state-dir", f"cannot create {d!r}: {exc.strerror}",
                                  "give a folder the relay may write") from None
        for d in folders[1:]:
            os.chmod(d, 0o700)

    def load_stored(self) -> Optional[StoredCertificate]:
        """Create the folders; install the stored certificate if it covers the names and is
        within its validity (renewal may be due: :meth:`step` sees to that)."""
        self.prepare()
        stored = load_certificate(self.cert_path, self.key_path)
        if stored is not None and covers(stored.names, self.names) and \
                stored.not_before <= self.clock() < stored.not_after:
            self.current = stored
            log.info("acme: using the stored certificate for %s (valid until %s, renewal from %s)",
                     ", ".join(self.names), stored.until(), _when(stored.renew_at))
            self._install(stored)
        return self.current

    async def start(self) -> None:
        """:meth:`load_stored`, then keep the certificate fresh in the background."""
        self.load_stored()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._withdraw()

    async def _run(self) -> None:
        while True:
            delay = await self.step()
            await asyncio.sleep(min(max(delay, 0.0), MAX_SLEEP))

    # -- the schedule -------------------------------------------------------------------------
    def due(self) -> float:
        """Seconds until the next order (0: now)."""
        cur = self.current
        if cur is None or not covers(cur.names, self.names):
            return 0.0
        return max(0.0, cur.renew_at - self.clock())

    async def step(self) -> float:
        """Order when due; returns the seconds to wait before the next step."""
        wait = self.due()
        if wait > 0:
            return wait
        if self.allow_order is not None:
            wait = self.allow_order()
            if wait > 0:
                return wait
        share = self.share
        if share is not None:
            try:
                adopted = await self._adopt_shared()
                if adopted is not None:
                    return max(MIN_INTERVAL, adopted.renew_at - self.clock())
                if not await share.claim():
                    log.info("acme: another relay of the fleet is ordering; looking again in "
                             "%d s", SHARE_WAIT)
                    return SHARE_WAIT
            except StoreError as exc:
                log.warning("acme: %s; looking again in %d s", exc, SHARE_WAIT)
                return SHARE_WAIT
        try:
            new = await self.renew()
            if share is not None:
                await share.offer(*await _in_thread(self._read_stored, new))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure: keep serving, log one line, back off
            self.failures += 1
            log.debug("acme: the order failed", exc_info=True)
            delay = min(self.retry_max, self.retry_first * 2 ** (self.failures - 1))
            cur = self.current
            if cur is None:
                keeping = "no certificate yet"
            elif cur.not_after > self.clock():
                keeping = f"still serving the certificate valid until {cur.until()}"
            else:
                keeping = f"the certificate served expired at {cur.until()}"
            log.warning("acme: no certificate from %s: %s; %s; retry %d in %d s",
                        self.directory_url, _reason(exc), keeping, self.failures + 1, delay)
            return delay
        finally:
            if share is not None:
                await share.release()
        self.failures = 0
        return max(MIN_INTERVAL, new.renew_at - self.clock())

    async def _adopt_shared(self) -> Optional[StoredCertificate]:
        """Install the fleet's certificate if it covers the names, is newer than ours and not
        due itself; returns it, or None."""
        got = await self.share.latest()
        if got is None:
            return None
        chain_pem, key_pem = got
        ends, begins = _validity(chain_pem)
        if ends is None or begins is None:
            return None
        cur = self.current
        if begins + RENEW_AT * (ends - begins) <= self.clock() or \
                (cur is not None and ends <= cur.not_after):
            return None  # due as well, or not newer than what we serve
        try:
            stored = await _in_thread(self._store, chain_pem, key_pem)
        except AcmeFailed as exc:
            log.warning("acme: the fleet's certificate is not usable here: %s", exc)
            return None
        self.current = stored
        log.info("acme: installed the fleet's certificate for %s (serial %x, valid until %s)",
                 ", ".join(sorted(stored.names)), stored.serial, stored.until())
        self._install(stored)
        return stored

    @staticmethod
    def _read_stored(stored: StoredCertificate) -> tuple:
        with open(stored.cert_path, encoding="ascii") as f:
            chain = f.read()
        with open(stored.key_path, "rb") as k:
            key = k.read()
        return chain, key

    async def renew(self) -> StoredCertificate:
        """Order a certificate now, store it and install it (raises on failure)."""
        self.orders += 1
        log.info("acme: ordering a certificate for %s from %s", ", ".join(self.names),
                 self.directory_url)
        session = await _in_thread(self._begin_order)
        try:
            by_name: dict = {}
            for ch in session["challenges"]:
                by_name.setdefault(ch.name, []).append(ch.value)
            for name, values in by_name.items():
                self.publish_txt(name, values)  # all values of one name at once
                self._published.append((name, values))
                if self.share is not None:  # and on every relay of the fleet, confirmed
                    self._shared_txt.append((name, values))
                    await self.share.publish_txt(name, values)
                if self.challenge == "dns-01":
                    log.info("acme: dns-01: serving %d TXT value%s at %s", len(values),
                             "" if len(values) == 1 else "s", name)
                else:
                    log.info("acme: http-01: serving the key authorization at %s", name)
            chain_pem = await _in_thread(self._finish_order, session)
        finally:
            self._withdraw()
            await self._withdraw_shared()
        stored = await _in_thread(self._store, chain_pem, session["key_pem"])
        self.current = stored
        log.info("acme: certificate for %s installed (serial %x, valid until %s, renewal from %s)",
                 ", ".join(sorted(stored.names)), stored.serial, stored.until(),
                 _when(stored.renew_at))
        self._install(stored)
        return stored

    def _install(self, stored: StoredCertificate) -> None:
        try:
            self.on_certificate(stored.cert_path, stored.key_path)
        except Exception as exc:
            log.error("acme: installing %s failed: %s", stored.cert_path, _reason(exc))

    async def _withdraw_shared(self) -> None:
        while self._shared_txt:
            name, values = self._shared_txt.pop()
            try:
                await self.share.withdraw_txt(name, values)
            except Exception as exc:
                log.warning("acme: withdrawing the fleet's TXT values at %s failed: %s", name,
                            _reason(exc))

    def _withdraw(self) -> None:
        while self._published:
            name, values = self._published.pop()
            try:
                self.withdraw_txt(name, values)
            except Exception as exc:
                log.warning("acme: withdrawing the TXT values at %s failed: %s", name, _reason(exc))

    # -- the blocking parts (run in a thread) -------------------------------------------------
    def _client(self) -> tuple:
        """The ACME client with the stored (or a new) account key; returns (client, jwk)."""
        import josepy as jose
        from acme import client as acme_client

        with _ACCOUNT_LOCK:
            key = self._account_key()
        jwk = jose.JWKEC(key=key)
        verify: Any = self.ca_file or True  # requests takes a CA file where a bool is typed
        net = acme_client.ClientNetwork(jwk, alg=jose.ES256, verify_ssl=verify,
                                        user_agent="kite-relay", timeout=NETWORK_TIMEOUT)
        directory = acme_client.ClientV2.get_directory(self.directory_url, net)
        return acme_client.ClientV2(directory, net), jwk

    def _account_key(self) -> Any:
        """The stored account key, else a new one (stored, and the account forgotten)."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        try:
            with open(self.account_key_path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise AcmeFailed(f"{self.account_key_path}: not an EC key")
        except FileNotFoundError:
            key = ec.generate_private_key(ec.SECP256R1())
            _write_private(self.account_key_path, key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
            self._forget_account()
        except ValueError:
            raise AcmeFailed(f"{self.account_key_path} is not a PEM private key") from None
        return key

    def _forget_account(self) -> None:
        try:
            os.unlink(self.account_path)
        except FileNotFoundError:
            pass

    def _account(self, client: Any, *, fresh: bool = False) -> None:
        """Point ``client`` at our account: the stored URI, else register (or find) it."""
        from acme import messages

        uri = None
        if not fresh:
            try:
                with open(self.account_path, encoding="utf-8") as f:
                    uri = json.load(f).get("uri")
            except (OSError, ValueError, AttributeError):
                uri = None
        if uri:
            client.net.account = messages.RegistrationResource(uri=uri, body=messages.Registration())
            return
        with _ACCOUNT_LOCK:
            self._register(client)

    def _register(self, client: Any) -> None:
        """Register the key's account (or find it) and store its URI."""
        from acme import errors as acme_errors
        from acme import messages

        client.net.account = None
        reg = messages.NewRegistration.from_data(email=self.email, terms_of_service_agreed=True)
        try:
            regr = client.new_account(reg)
            uri = regr.uri
            log.info("acme: registered account %s", uri)
        except acme_errors.ConflictError as exc:  # this key has an account already
            uri = exc.location
            client.net.account = messages.RegistrationResource(uri=uri, body=messages.Registration())
        _write_private(self.account_path, json.dumps(
            {"uri": uri, "email": self.email, "directory": self.directory_url}).encode())

    def _begin_order(self) -> dict:
        """Account, certificate key, CSR and ``newOrder``; the challenge values to publish."""
        from acme import challenges, messages
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        client, jwk = self._client()
        key = ec.generate_private_key(ec.SECP256R1())
        subject = [x509.NameAttribute(NameOID.COMMON_NAME, self.names[0])] \
            if len(self.names[0]) <= 64 else []
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name(subject))
               .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in self.names]),
                              critical=False)
               .sign(key, hashes.SHA256()))
        csr_pem = csr.public_bytes(serialization.Encoding.PEM)
        self._account(client)
        try:
            orderr = client.new_order(csr_pem)
        except messages.Error as exc:
            if exc.code != "accountDoesNotExist":
                raise
            # The CA does not know the stored account URI: find the key's account, or make one.
            self._account(client, fresh=True)
            orderr = client.new_order(csr_pem)
        found = []
        dns = self.challenge == "dns-01"
        for authzr in orderr.authorizations:
            if authzr.body.status == messages.STATUS_VALID:
                continue  # the CA reused a valid authorization
            ident = authzr.body.identifier.value
            for challb in authzr.body.challenges:
                chall = challb.chall
                if dns and isinstance(chall, challenges.DNS01):
                    where = chall.validation_domain_name(ident)
                elif not dns and isinstance(chall, challenges.HTTP01):
                    where = ident.lower() + chall.path
                else:
                    continue
                found.append(_Challenge(where, chall.validation(jwk), challb,
                                        challb.response(jwk)))
                break
            else:
                raise AcmeFailed(f"the CA offers no {self.challenge} challenge for {ident!r}")
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return {"client": client, "order": orderr, "challenges": found, "key_pem": key_pem}

    def _finish_order(self, session: dict) -> str:
        """Answer the challenges, wait for the authorizations, finalize; the PEM chain."""
        client = session["client"]
        for ch in session["challenges"]:
            client.answer_challenge(ch.challb, ch.response)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_DEADLINE)
        orderr = client.poll_and_finalize(session["order"], deadline)
        if not orderr.fullchain_pem:
            raise AcmeFailed("the CA finalized the order without a certificate")
        return orderr.fullchain_pem

    def _store(self, chain_pem: str, key_pem: bytes) -> StoredCertificate:
        """Check the new chain against its key and the names, then put both in place (each
        0600, atomic; the key first, so a cut-short write leaves a mismatch that is ignored)."""
        _write_private(self.key_path + ".new", key_pem)
        _write_private(self.cert_path + ".new", chain_pem.encode())
        fresh = load_certificate(self.cert_path + ".new", self.key_path + ".new")
        if fresh is None:
            raise AcmeFailed("the CA's certificate does not match the key it was ordered with")
        if not covers(fresh.names, self.names):
            raise AcmeFailed(f"the CA's certificate names {sorted(fresh.names)}, "
                             f"not {self.names}")
        os.replace(self.key_path + ".new", self.key_path)
        os.replace(self.cert_path + ".new", self.cert_path)
        return dataclasses.replace(fresh, cert_path=self.cert_path, key_path=self.key_path)
