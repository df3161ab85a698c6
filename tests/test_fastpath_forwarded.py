"""The compiled rewrite of one whole request head (kite._forwarded) against the rewriter's
own Python path (kite.proto.forwarded), its executable specification.

Both paths get the same heads, one whole head per feed (the only way the compiled one is
used); output, exception, state and request count must be the same.  Where the compiled
path answers at all it must be because the head is the plain case (no body, no upgrade),
and for the plain case it must answer: a counter proves that the comparison ran through it.
The heads come from real clients and from Hypothesis, which mixes the field names the
rewriter cares about (in every spelling) with framing fields, versions and methods.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kite import fastpath
from kite.errors import KiteError
from kite.proto.forwarded import ForwardedRewriter

pytestmark = pytest.mark.skipif(fastpath.rewrite_one_head is None,
                                reason="the compiled rewrite is not in use (the twin runs)")

CLIENT_IP = "203.0.113.7"


class PythonPath(ForwardedRewriter):
    """The specification alone."""

    __slots__ = ()
    _one_head = None


class CountedPath(ForwardedRewriter):
    """The compiled path first, counting the heads it took."""

    __slots__ = ()
    taken = 0

    @staticmethod
    def _one_head(head, fixed, copy_host):
        done = fastpath.rewrite_one_head(head, fixed, copy_host)
        if done is not None:
            CountedPath.taken += 1
        return done


def outcome(cls, heads, host):
    rw = cls(client_ip=CLIENT_IP, proto="https", host=host)
    out = []
    for head in heads:
        try:
            out.append(rw.feed(head))
        except KiteError as exc:
            out.append((type(exc).__name__, str(exc)))
            break
    return out, rw.state, rw.requests


def assert_same(heads, *, host="app.example"):
    """Both paths agree; returns how many heads the compiled path took."""
    before = CountedPath.taken
    assert outcome(CountedPath, heads, host) == outcome(PythonPath, heads, host)
    return CountedPath.taken - before


PLAIN = [
    b"GET /1k.bin HTTP/1.1\r\nHost: app.bench.kite\r\n\r\n",
    b"GET /index.html?q=1&r=%20 HTTP/1.1\r\nHost: app.example\r\nUser-Agent: curl/7.88.1\r\n"
    b"Accept: */*\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nHost: app.example:8080\r\nConnection: keep-alive\r\n\r\n",
    b"DELETE /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    b"GET / HTTP/1.0\r\nUser-Agent: Wget/1.21\r\nAccept: */*\r\n\r\n",
    b"GET /a HTTP/1.0\r\nHost: app.example\r\nConnection: keep-alive\r\n\r\n",
    b"GET /last HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.1\r\nhOsT:   spaced.example \t \r\n\r\n",
    b"GET / HTTP/1.1\r\nHost:\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    # every forwarding field a visitor must not set, renamed; look-alikes left alone
    b"GET /whoami HTTP/1.1\r\nHost: app.example\r\nX-Forwarded-For: 6.6.6.6\r\n"
    b"x-forwarded-proto: http\r\nX_Forwarded_For: 6.6.6.7\r\nx-FORWARDED_host: evil\r\n"
    b"X-Forwarded-Port: 1\r\nForwarded: for=6.6.6.8\r\nX-Real-IP: 6.6.6.9\r\n"
    b"x_real_ip: 6.6.6.10\r\nX-PageKite-Port: 2\r\nx-pagekite_for: 3\r\n"
    b"X-PAGEKITE-PROTO: 4\r\nX-PageKite-Foo: 5\r\nX-Forwarded: no\r\nX-Forwarded-: no\r\n"
    b"Forwarded-For: no\r\nX-Old-X-Forwarded-For: already-old\r\n"
    b"Referer: http://x/?X-Forwarded-For: 1.1.1.1\r\n\r\n",
]

NOT_PLAIN = [
    b"POST /form HTTP/1.1\r\nHost: app.example\r\nContent-Length: 5\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"CONNECT app.example:443 HTTP/1.1\r\nHost: app.example:443\r\n\r\n",
    b"GET / HTTP/1.0\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET / RTSP/1.0\r\nHost: a\r\n\r\n",
    b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
    b"get / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad\x01Name: a\r\n\r\n",
    b"GET / HTTP/1.1\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"".join(b"X-Real-IP: %d\r\n" % i for i in range(40)) + b"\r\n",
]


def closes(head):
    return b"Connection: close" in head or (b"HTTP/1.0" in head and b"keep-alive" not in head)


@pytest.mark.parametrize("head", PLAIN)
@pytest.mark.parametrize("host", ["app.example", None])
def test_plain_heads_take_the_compiled_path_with_the_same_result(head, host):
    # After a head that closes the connection the stream discards: no second head is seen
    # (the state compared in assert_same says the Python path agrees).
    assert assert_same([head, head], host=host) == (1 if closes(head) else 2)


@pytest.mark.parametrize("head", NOT_PLAIN)
def test_other_heads_are_left_to_the_python_path(head):
    assert fastpath.rewrite_one_head(head, b"X-Forwarded-For: 1.2.3.4\r\n", False) is None
    assert assert_same([head]) == 0


def test_the_exact_bytes_of_a_rewrite():
    head = (b"GET /p HTTP/1.1\r\nHost:  app.example \r\nForwarded: for=1\r\nAccept: */*\r\n"
            b"x_real_ip: 2\r\n\r\n")
    fixed = b"X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n"
    out, keep_alive = fastpath.rewrite_one_head(head, fixed, True)
    assert keep_alive
    assert out == (b"GET /p HTTP/1.1\r\n" + fixed + b"X-Forwarded-Host: app.example\r\n"
                   b"Host:  app.example \r\nX-Old-Forwarded: for=1\r\nAccept: */*\r\n"
                   b"X-Old-x_real_ip: 2\r\n\r\n")
    out, keep_alive = fastpath.rewrite_one_head(
        b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", fixed, True)
    assert (out, keep_alive) == (b"GET / HTTP/1.1\r\n" + fixed + b"Connection: close\r\n\r\n",
                                 False)


def test_a_keep_alive_stream_of_many_heads():
    keep = [head for head in PLAIN if not closes(head)]
    heads = [keep[i % len(keep)] for i in range(300)]
    assert assert_same(heads) == 300
    assert assert_same(heads, host=None) == 300


def test_a_subclass_that_changes_a_step_runs_the_python_path():
    from kite.backend.basicauth import AuthGate

    class Shouting(ForwardedRewriter):
        __slots__ = ()

        def _rewrite_head(self, head, line_end, ev):
            return super()._rewrite_head(head, line_end, ev).upper()

    assert AuthGate._one_head is None and Shouting._one_head is None
    assert CountedPath._one_head is not None and ForwardedRewriter._one_head is not None
    rw = Shouting(client_ip=CLIENT_IP, proto="https", host="app.example")
    assert rw.feed(PLAIN[0]).startswith(b"GET /1K.BIN HTTP/1.1\r\nX-FORWARDED-FOR: ")


def test_input_type_is_checked():
    with pytest.raises(TypeError):
        fastpath.rewrite_one_head(bytearray(b"GET / HTTP/1.1\r\n\r\n"), b"", False)
    with pytest.raises(TypeError):
        fastpath.rewrite_one_head(None, b"", False)


_NAMES = [
    b"Host", b"host", b"HOST", b"Content-Length", b"content_length", b"Transfer-Encoding",
    b"Connection", b"Upgrade", b"X-Forwarded-For", b"x_forwarded_proto", b"X-Forwarded-",
    b"X-Forwarded-X", b"X-Forwarded", b"Forwarded", b"forwarded-x", b"X-Real-IP",
    b"x_real_ip", b"X-Real-IPs", b"X-PageKite-For", b"X-Pagekite-Proto", b"x-pagekite_port",
    b"X-PageKite-Foo", b"Accept", b"Cookie", b"Authorization", b"X-Old-Forwarded",
]
_VALUES = [
    b"", b"a", b" 0", b"0", b"00", b"5", b"chunked", b"gzip, chunked", b"close",
    b"keep-alive", b"upgrade", b"Upgrade", b"websocket", b" spaced \t", b"1.2.3.4",
    b"app.example:8080", b"\xe4\xf6",
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from([b"GET", b"HEAD", b"POST", b"DELETE", b"OPTIONS", b"PUT",
                            b"CONNECT", b"get"]),
    target=st.sampled_from([b"/", b"/a?b=c", b"*", b"app.example:443", b"http://x/"]),
    version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0",
                             b"RTSP/1.0"]),
    fields=st.lists(st.tuples(st.sampled_from(_NAMES), st.sampled_from([b":", b": ", b" :"]),
                              st.sampled_from(_VALUES)), max_size=8),
    host=st.sampled_from(["app.example", None]),
    repeat=st.integers(1, 3),
)
def test_any_head_gets_the_same_result_on_both_paths(method, target, version, fields, host,
                                                      repeat):
    head = b"%s %s %s\r\n%s\r\n" % (method, target, version,
                                     b"".join(n + sep + v + b"\r\n" for n, sep, v in fields))
    assert assert_same([head] * repeat, host=host) >= 0
