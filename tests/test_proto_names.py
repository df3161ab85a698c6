"""kite.proto.names: kite protocols and domains, the one place wildcards are walked."""

import pytest

from kite.proto.names import (
    bare_proto,
    domain_candidates,
    domain_matches,
    proto_port,
    valid_domain,
    valid_proto,
)


def test_bare_proto_and_port():
    assert bare_proto("raw-22") == "raw" and proto_port("raw-22") == 22
    assert bare_proto("http") == "http" and proto_port("http") is None
    assert proto_port("raw-x") is None and proto_port("raw-²2") is None
    assert proto_port("raw-123456") is None


@pytest.mark.parametrize("proto,ok", [
    ("http", True), ("https", True), ("raw", True), ("websocket", True), ("raw-22", True),
    ("http-8080", True), ("raw-0", False), ("raw-65536", False), ("ftp", False), ("raw-", False),
    ("raw-¹", False), ("", False),
])
def test_valid_proto(proto, ok):
    assert valid_proto(proto) is ok


@pytest.mark.parametrize("domain,ok", [
    ("app.example.com", True), ("*.example.com", True), ("a_b.example", True),
    ("*", False), ("", False), ("a..b", False), ("a b.c", False), ("a:b.c", False),
    ("x" * 64 + ".com", False), ("é.example", False), ("*.*.example", False),
])
def test_valid_domain(domain, ok):
    assert valid_domain(domain) is ok


def test_valid_domain_without_wildcards():
    assert not valid_domain("*.example.com", wildcard=False)


def test_domain_candidates_most_specific_first():
    assert domain_candidates("a.b.example.com") == [
        "a.b.example.com", "*.b.example.com", "*.example.com", "*.com"]
    assert domain_candidates("localhost") == ["localhost"]


def test_domain_matches():
    assert domain_matches("app.example.com", "app.example.com") == 2
    assert domain_matches("*.example.com", "app.example.com") == 1
    assert domain_matches("*.example.com", "a.b.example.com") == 1
    assert domain_matches("*.example.com", "example.com") == 0
    assert domain_matches("*.example.com", "badexample.com") == 0
    assert domain_matches("app.example.com", "other.example.com") == 0
