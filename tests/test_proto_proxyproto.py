"""PROXY protocol v1/v2 builders and parser (kite.proto.proxyproto), plus nginx as a judge."""

import os
import shutil
import socket
import subprocess
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kite.errors import LocalProtocolError, RemoteProtocolError
from kite.proto.proxyproto import (
    PROXY_V1_UNKNOWN,
    PROXY_V2_LOCAL,
    PROXY_V2_SIGNATURE,
    proxy_v1,
    proxy_v2,
)
from support import free_port
from wire import parse_proxy_header

# -- exact vectors from haproxy/doc/proxy-protocol.txt -------------------------------------

SPEC_V1_TCP4 = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
# "the worst case (optional fields set to 0xff)" from section 2.1, 107 bytes.
SPEC_V1_WORST_UNKNOWN = (
    b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
    b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
)
SPEC_V1_WORST_TCP6 = (
    b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
    b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
)


def test_signature_is_the_spec_one():
    assert PROXY_V2_SIGNATURE == b"\x0D\x0A\x0D\x0A\x00\x0D\x0A\x51\x55\x49\x54\x0A"
    assert PROXY_V2_SIGNATURE == b"\r\n\r\n\x00\r\nQUIT\n"


def test_v1_spec_example_built_exactly():
    assert proxy_v1("192.168.0.1", 56324, "192.168.0.11", 443) == SPEC_V1_TCP4


def test_v1_spec_example_parsed():
    assert parse_proxy_header(SPEC_V1_TCP4 + b"GET / HTTP/1.0\r\n\r\n") == (
        len(SPEC_V1_TCP4),
        ("192.168.0.1", 56324),
        ("192.168.0.11", 443),
    )


def test_v1_worst_cases_from_spec():
    assert len(SPEC_V1_WORST_UNKNOWN) == 107
    assert parse_proxy_header(SPEC_V1_WORST_UNKNOWN) == (107, None, None)
    assert parse_proxy_header(SPEC_V1_WORST_TCP6) == (
        len(SPEC_V1_WORST_TCP6),
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
    )
    assert parse_proxy_header(PROXY_V1_UNKNOWN + b"x") == (15, None, None)


def test_v2_spec_layout_ipv4():
    # Section 2.2: signature, 0x21 (v2, PROXY), 0x11 (AF_INET, STREAM), len=12,
    # src addr, dst addr, src port, dst port, network byte order.
    expected = (
        PROXY_V2_SIGNATURE
        + b"\x21\x11\x00\x0c"
        + bytes([192, 168, 0, 1])
        + bytes([192, 168, 0, 11])
        + (56324).to_bytes(2, "big")
        + (443).to_bytes(2, "big")
    )
    assert proxy_v2("192.168.0.1", 56324, "192.168.0.11", 443) == expected
    assert parse_proxy_header(expected) == (28, ("192.168.0.1", 56324), ("192.168.0.11", 443))


def test_v2_spec_layout_ipv6():
    built = proxy_v2("2001:db8::1", 1, "2001:db8::2", 65535)
    assert built[:16] == PROXY_V2_SIGNATURE + b"\x21\x21\x00\x24"  # AF_INET6, STREAM, 36
    assert built[16:32] == bytes.fromhex("20010db8000000000000000000000001")
    assert built[32:48] == bytes.fromhex("20010db8000000000000000000000002")
    assert built[48:] == b"\x00\x01\xff\xff"
    assert parse_proxy_header(built) == (52, ("2001:db8::1", 1), ("2001:db8::2", 65535))


def test_v1_ipv6():
    assert proxy_v1("2001:db8::1", 1234, "::1", 80) == b"PROXY TCP6 2001:db8::1 ::1 1234 80\r\n"


# -- IPv4-mapped and mixed families -----------------------------------------------------


def test_mapped_addresses_are_ipv4():
    assert proxy_v1("::ffff:10.1.2.3", 5, "::ffff:10.9.9.9", 80) == (
        b"PROXY TCP4 10.1.2.3 10.9.9.9 5 80\r\n"
    )
    v2 = proxy_v2("::ffff:10.1.2.3", 5, "10.9.9.9", 80)
    assert v2[13] == 0x11 and len(v2) == 28
    assert parse_proxy_header(v2) == (28, ("10.1.2.3", 5), ("10.9.9.9", 80))


def test_mixed_families_map_the_ipv4_side():
    assert proxy_v1("10.1.2.3", 5, "2001:db8::9", 443) == (
        b"PROXY TCP6 ::ffff:10.1.2.3 2001:db8::9 5 443\r\n"
    )
    v2 = proxy_v2("2001:db8::9", 5, "10.1.2.3", 443)
    assert v2[13] == 0x21
    assert v2[32:48] == b"\x00" * 10 + b"\xff\xff" + bytes([10, 1, 2, 3])
    # the parser reports a mapped address as the IPv4 address it stands for
    assert parse_proxy_header(v2) == (52, ("2001:db8::9", 5), ("10.1.2.3", 443))
    assert parse_proxy_header(b"PROXY TCP6 ::ffff:10.1.2.3 ::1 5 443\r\n")[1] == ("10.1.2.3", 5)


def test_scope_id_dropped():
    assert proxy_v1("fe80::1%eth0", 1, "fe80::2", 2) == b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"


@pytest.mark.parametrize(
    "args",
    [
        ("nope", 1, "1.2.3.4", 2),
        ("1.2.3.4", -1, "1.2.3.4", 2),
        ("1.2.3.4", 1, "1.2.3.4", 65536),
        ("1.2.3.4", 1, "1.2.3.4", "80"),
        ("1.2.3.4\r\nX", 1, "1.2.3.4", 80),
    ],
)
def test_builders_reject_bad_arguments(args):
    with pytest.raises(LocalProtocolError):
        proxy_v1(*args)
    with pytest.raises(LocalProtocolError):
        proxy_v2(*args)


# -- v2 TLVs, LOCAL, other families -----------------------------------------------------


def test_v2_tlvs_are_covered_by_header_len():
    built = proxy_v2("1.2.3.4", 1, "5.6.7.8", 2, tlvs=[(0x02, b"app.example.com")])
    assert int.from_bytes(built[14:16], "big") == 12 + 3 + 15
    assert built[28:] == b"\x02\x00\x0fapp.example.com"
    assert parse_proxy_header(built + b"rest") == (len(built), ("1.2.3.4", 1), ("5.6.7.8", 2))
    with pytest.raises(LocalProtocolError):
        proxy_v2("1.2.3.4", 1, "5.6.7.8", 2, tlvs=[(256, b"")])


def test_v2_local_and_unspec_and_unix():
    assert parse_proxy_header(PROXY_V2_LOCAL + b"x") == (16, None, None)
    # LOCAL with an address block: the block is ignored but skipped
    local_inet = PROXY_V2_SIGNATURE + b"\x20\x11\x00\x0c" + bytes(12)
    assert parse_proxy_header(local_inet) == (28, None, None)
    unspec = PROXY_V2_SIGNATURE + b"\x21\x00\x00\x00"
    assert parse_proxy_header(unspec) == (16, None, None)
    unix = PROXY_V2_SIGNATURE + b"\x21\x31\x00\xd8" + bytes(216)
    assert parse_proxy_header(unix) == (232, None, None)


def test_v2_udp_is_parsed():
    dgram = bytearray(proxy_v2("1.2.3.4", 53, "5.6.7.8", 53))
    dgram[13] = 0x12
    assert parse_proxy_header(bytes(dgram)) == (28, ("1.2.3.4", 53), ("5.6.7.8", 53))


# -- need more / errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        SPEC_V1_TCP4,
        proxy_v1("2001:db8::1", 1, "2001:db8::2", 2),
        proxy_v2("192.168.0.1", 56324, "192.168.0.11", 443),
        proxy_v2("2001:db8::1", 1, "2001:db8::2", 2, tlvs=[(1, b"h2")]),
        PROXY_V2_LOCAL,
    ],
)
def test_every_proper_prefix_needs_more(header):
    for i in range(len(header)):
        assert parse_proxy_header(header[:i]) is None, i
        assert parse_proxy_header(memoryview(header)[:i]) is None, i
    assert parse_proxy_header(bytearray(header))[0] == len(header)


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"\x16\x03\x01\x02\x00",
        b"PROXX",
        b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n",
        b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n",
        b"PROXY TCP4 1.2.3.4  1.2.3.4 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 \r\n",
        b"PROXY TCP4 ::1 ::1 1 2\r\n",
        b"PROXY TCP6 1.2.3.4 1.2.3.4 1 2\r\n",
        b"PROXY TCP4 1.2.3.256 1.2.3.4 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 +1 2\r\n",
        b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2" + b" " * 80,  # no CRLF within 107 bytes
        b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c",
        b"\r\n\r\nGET",
        PROXY_V2_SIGNATURE + b"\x11\x11\x00\x0c",  # version 1 in a v2 header
        PROXY_V2_SIGNATURE + b"\x22\x11\x00\x0c",  # command 2
        PROXY_V2_SIGNATURE + b"\x21\x13\x00\x0c",  # transport 3
        PROXY_V2_SIGNATURE + b"\x21\x41\x00\x0c",  # family 4
        PROXY_V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),  # AF_INET block too short
        PROXY_V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12),  # AF_INET6 block too short
        PROXY_V2_SIGNATURE + b"\x21\x31\x00\x0c" + bytes(12),  # AF_UNIX block too short
        PROXY_V2_SIGNATURE + b"\x21\x11\xff\xff",  # 65551 bytes > default max_len
    ],
)
def test_malformed_headers_raise(data):
    with pytest.raises(RemoteProtocolError):
        parse_proxy_header(data)


def test_max_len_is_honoured():
    built = proxy_v2("1.2.3.4", 1, "5.6.7.8", 2, tlvs=[(0xE0, bytes(200))])
    with pytest.raises(RemoteProtocolError, match="exceeds 100"):
        parse_proxy_header(built[:16], max_len=100)  # refused before the block arrives
    assert parse_proxy_header(built, max_len=len(built))[0] == len(built)


# -- round trips --------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


def _norm(ip):
    import ipaddress

    a = ipaddress.ip_address(ip)
    if a.version == 6 and a.ipv4_mapped:
        return str(a.ipv4_mapped)
    return str(a)


@settings(max_examples=300, deadline=None)
@given(src=ipv4 | ipv6, sport=ports, dst=ipv4 | ipv6, dport=ports, tail=st.binary(max_size=20))
def test_round_trip(src, sport, dst, dport, tail):
    for build in (proxy_v1, proxy_v2):
        header = build(src, sport, dst, dport)
        assert len(header) <= 107 or build is proxy_v2
        n, s, d = parse_proxy_header(header + tail)
        assert n == len(header)
        assert s == (_norm(src), sport) and d == (_norm(dst), dport)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_parser_never_crashes(data):
    try:
        parse_proxy_header(data)
    except RemoteProtocolError:
        pass


# -- nginx as an independent receiver ---------------------------------------------------

NGINX = "/usr/sbin/nginx"



@pytest.fixture(scope="module")
def nginx_port(tmp_path_factory):
    if not os.path.exists(NGINX) or shutil.which(NGINX) is None:
        pytest.skip(f"{NGINX} not installed (Debian: apt-get install nginx-light)")
    prefix = tmp_path_factory.mktemp("nginx")
    port = free_port()
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / d).mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port} proxy_protocol;
        location / {{
            default_type text/plain;
            return 200 "$proxy_protocol_addr $proxy_protocol_port";
        }}
    }}
}}
"""
    )
    proc = subprocess.Popen(
        [
            NGINX,
            "-p", str(prefix),
            "-c", str(conf),
            "-e", str(prefix / "error.log"),
            "-g", f"daemon off; master_process off; pid {prefix}/nginx.pid;",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                log = (prefix / "error.log").read_text() if (prefix / "error.log").exists() else ""
                pytest.fail(f"nginx exited with {proc.returncode}: {log[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("nginx did not start listening within 10 s")
                time.sleep(0.02)
        yield port
    finally:
        proc.kill()  # by PID: only the process this fixture started
        proc.wait(timeout=10)


def _ask_nginx(port, header):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(header + b"GET / HTTP/1.0\r\nHost: t\r\n\r\n")
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    response = b"".join(chunks)
    assert response.startswith(b"HTTP/1.1 200"), response[:200]
    return response.split(b"\r\n\r\n", 1)[1].decode()


@pytest.mark.parametrize(
    "build, src, sport, expected",
    [
        (proxy_v1, "203.0.113.7", 40001, "203.0.113.7 40001"),
        (proxy_v2, "203.0.113.8", 40002, "203.0.113.8 40002"),
        (proxy_v1, "2001:db8::7", 40003, "2001:db8::7 40003"),
        (proxy_v2, "2001:db8::8", 40004, "2001:db8::8 40004"),
        (proxy_v2, "::ffff:198.51.100.9", 40005, "198.51.100.9 40005"),
    ],
)
def test_nginx_sees_the_client_address(nginx_port, build, src, sport, expected):
    dst = "127.0.0.1" if ":" not in src or src.startswith("::ffff:") else "::1"
    assert _ask_nginx(nginx_port, build(src, sport, dst, nginx_port)) == expected


def test_nginx_accepts_v2_tlvs(nginx_port):
    header = proxy_v2("192.0.2.1", 1, "127.0.0.1", nginx_port, tlvs=[(0x02, b"app.example")])
    assert _ask_nginx(nginx_port, header) == "192.0.2.1 1"
