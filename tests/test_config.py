"""kite.config: the checks shared by ``kite expose`` and the client commands."""

from __future__ import annotations

import pytest

from kite.config import check_tls_mode
from kite.errors import ConfigError


def test_check_tls_mode_allows_one_way_to_check_the_relay():
    assert check_tls_mode() is None
    assert check_tls_mode(ca="relay.pem") == "--ca"
    assert check_tls_mode(fingerprint="ab" * 32) == "--fingerprint"
    assert check_tls_mode(insecure=True) == "--insecure"
    assert check_tls_mode(plain=True) == "--plain"


@pytest.mark.parametrize("kw, key, first", [
    ({"ca": "r.pem", "fingerprint": "ab"}, "--fingerprint", "--ca"),
    ({"insecure": True, "fingerprint": "ab"}, "--insecure", "--fingerprint"),
    ({"ca": "r.pem", "plain": True}, "--plain", "--ca"),
    ({"insecure": True, "plain": True, "ca": "r.pem"}, "--insecure", "--ca"),
])
def test_check_tls_mode_names_the_second_option(kw, key, first):
    with pytest.raises(ConfigError) as info:
        check_tls_mode(**kw)
    assert info.value.key == key
    assert str(info.value) == (f"{key}: cannot be combined with {first} "
                               "(choose one way to check the relay)")
