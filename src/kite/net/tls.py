"""TLS material and contexts: self-signed certificates, server and client contexts, pinning.

The relay terminates TLS for tunnels, and for visitors of http kites its certificates cover
(:mod:`kite.certs`); the TLS of https kites passes through untouched, routed by SNI.  The
backend verifies the relay's certificate against a CA file, or pins its SHA-256 fingerprint,
unless the user explicitly says ``--insecure``.

Cipher suites (TLS 1.3): every context kite makes prefers ``TLS_AES_128_GCM_SHA256`` (the
suite RFC 8446 makes mandatory), then ChaCha20-Poly1305, then AES-256-GCM; OpenSSL's own
order puts AES-256-GCM first.  With AES instructions AES-128-GCM is a third cheaper per
byte (``openssl speed -evp`` on the 2-core development VM: 4.2 against 2.9 GB/s), and
every byte kite carries is encrypted and decrypted once per TLS hop - the visitor's, the
tunnel, a fleet link.  A server follows its own order, except for a client that lists
ChaCha20 first (a device without AES instructions says so): it gets ChaCha20
(``SSL_OP_PRIORITIZE_CHACHA``).  Only the order changes: the suites are those OpenSSL's
configuration enabled (a system policy that turns one off is obeyed).  The order is set
through :mod:`kite._tls` (``ssl`` has no call for it); without the compiled module
OpenSSL's order stays.  TLS 1.2 keeps Python's default list.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import ssl
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from ..errors import ConfigError

__all__ = [
    "TLS13_CIPHERSUITES",
    "prefer_ciphers",
    "tls13_order",
    "generate_self_signed",
    "server_context",
    "client_context",
    "cert_fingerprint",
    "normalize_fingerprint",
    "ClientTLS",
]


def generate_self_signed(
    cert_path: str,
    key_path: str,
    names: Sequence[str],
    *,
    days: int = 825,
    key_type: str = "ec",
) -> str:
    """Write a self-signed certificate (its own CA) for ``names``; return its SHA-256 pin.

    ``key_type`` "ec" (the default): an EC P-256 key, fast handshakes, small certificates;
    "rsa": RSA 2048.  The key file is created with mode 0600.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if key_type == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=True,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    with open(cert_path, "wb") as f:
        f.write(pem)
    return hashlib.sha256(der).hexdigest()


def cert_fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate, lower-case hex without separators."""
    return hashlib.sha256(der).hexdigest()


def normalize_fingerprint(value: str) -> str:
    """Accept ``AB:CD:...``, ``sha256:abcd...`` or plain hex; return 64 lower-case hex chars."""
    v = value.strip().lower()
    if v.startswith("sha256:"):
        v = v[7:]
    v = v.replace(":", "")
    if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
        raise ConfigError(
            "fingerprint", f"{value!r} is not a SHA-256 fingerprint",
            "give 64 hex digits, e.g. the value `kite init relay` printed",
        )
    return v


#: kite's TLS 1.3 cipher suites, in order of preference (see the module doc).
TLS13_CIPHERSUITES = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384"
#: OpenSSL's SSL_OP_PRIORITIZE_CHACHA (1.1.1 and 3.x), which ``ssl`` does not name.
OP_PRIORITIZE_CHACHA = 1 << 21


_UNSET: Any = object()
_setter: Any = _UNSET  # kite._tls.set_ciphersuites, or None; looked up at the first use


def _ciphersuite_setter() -> Optional[Callable[[ssl.SSLContext, str], None]]:
    global _setter
    if _setter is _UNSET:
        _setter = None
        if os.environ.get("KITE_NO_EXTENSIONS", "") in ("", "0"):
            try:
                from .. import _tls
            except ImportError:
                pass
            else:
                if _tls.available() is None:  # (a module built before the setter: none)
                    _setter = getattr(_tls, "set_ciphersuites", None)
    return _setter


def tls13_order(enabled: Sequence[str]) -> list[str]:
    """``enabled`` (the TLS 1.3 suites a context has) in kite's order: the suites kite
    ranks first, then any others as they were.  Nothing is added: a suite the system's
    OpenSSL configuration turned off stays off."""
    ranked = TLS13_CIPHERSUITES.split(":")
    return ([name for name in ranked if name in enabled]
            + [name for name in enabled if name not in ranked])


def prefer_ciphers(ctx: ssl.SSLContext) -> None:
    """Put the TLS 1.3 suites of ``ctx`` in kite's order (see the module doc); a server
    follows its own order, except for a client that lists ChaCha20 first."""
    if ctx.protocol == ssl.PROTOCOL_TLS_SERVER:
        # Python sets the first already; said here because the order depends on it.
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | OP_PRIORITIZE_CHACHA
    setter = _ciphersuite_setter()
    if setter is None:
        return
    enabled = [c["name"] for c in ctx.get_ciphers() if c.get("protocol") == "TLSv1.3"]
    ordered = tls13_order(enabled)
    if ordered != enabled:  # (none enabled: TLS 1.3 is off here, and stays so)
        setter(ctx, ":".join(ordered))


def server_context(cert_path: str, key_path: str) -> ssl.SSLContext:
    """The relay's context for tunnels (TLS 1.2+; pagekite.py 1.5.2 negotiates TLS 1.3)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    prefer_ciphers(ctx)
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            "tls-cert", f"cannot load {cert_path!r} / {key_path!r}: {exc}",
            "give a PEM certificate and its key; `kite init relay` writes a pair",
        ) from None
    return ctx


@dataclass(frozen=True)
class ClientTLS:
    """How a backend or helper checks the relay: CA file, pinned fingerprint, or nothing."""

    ca: Optional[str] = None
    fingerprint: Optional[str] = None
    insecure: bool = False
    server_name: Optional[str] = None  # SNI and the name checked against the certificate

    def context(self) -> ssl.SSLContext:
        return client_context(self.ca, insecure=self.insecure or bool(self.fingerprint))

    def check_peer(self, ssl_object) -> None:
        """Enforce the fingerprint pin after the handshake (raises ssl.SSLError)."""
        if not self.fingerprint:
            return
        der = ssl_object.getpeercert(binary_form=True)
        got = cert_fingerprint(der or b"")
        if got != self.fingerprint:
            msg = f"relay certificate fingerprint {got} does not match the pinned {self.fingerprint}"
            err = ssl.SSLCertVerificationError(msg)
            err.verify_message = msg  # as the ssl module's own verification errors carry
            err.verify_code = 0
            raise err


def client_context(ca: Optional[str] = None, *, insecure: bool = False) -> ssl.SSLContext:
    """A client context that verifies against ``ca`` (or the system store) unless insecure."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    prefer_ciphers(ctx)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif ca:
        try:
            ctx.load_verify_locations(ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                "ca", f"cannot load CA file {ca!r}: {exc}", "give the relay's certificate PEM"
            ) from None
    else:
        ctx.load_default_certs()
    return ctx
