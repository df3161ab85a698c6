"""Certificates of the relay: several pairs chosen by SNI, reloaded when their files change
(:mod:`kite.certs.store`)."""

from .store import CertPair, CertStore, load_pair, tls_server_context

__all__ = ["CertPair", "CertStore", "load_pair", "tls_server_context"]
