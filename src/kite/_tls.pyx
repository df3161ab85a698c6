# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, embedsignature=True
"""TLS over a socket, in C: an asyncio transport that calls OpenSSL itself.

uvloop (and asyncio) run TLS through ``ssl.SSLObject`` on two memory BIOs: every record
received is copied into OpenSSL's incoming BIO, every record sent is copied out of its
outgoing BIO into a new ``bytes``, and each step is a Python-level call.  This transport
lets OpenSSL read the socket itself (a socket BIO with read-ahead: one ``recv(2)`` brings
as many records as fit), and collects what OpenSSL writes in a buffer of its own (a BIO
whose write appends) that goes out in one ``send(2)`` per ``write()`` - the batching of the
memory BIO, without its copies.

OpenSSL here is the library Python's ``ssl`` module loaded: nothing is linked at build
time, every function is looked up (``dlsym``, through ctypes) in the libraries of ``_ssl``
at import, and the ``SSL_CTX`` is the one inside the ``ssl.SSLContext`` given (its first
field; at import, that field of a probe context is checked against the probe's options and
verify mode, and a mismatch turns this module off). So a context configured in Python
(certificates, ALPN, versions, verification) is used as it is, and no second copy of
OpenSSL can ever touch it; ``set_ciphersuites`` is the one setting this module adds to a
context (its TLS 1.3 order, which ``ssl`` cannot set). The context object is kept alive as
long as a connection uses it (its ALPN callback reads the Python object).  A context with
an SNI callback or a key-log file is refused (``usable``): OpenSSL calls those with the
connection's SSL, where Python's expect its own socket object; neither may be added to a
context while a connection uses it. The relay picks the context by the SNI it peeked before
the handshake; the per-connection callbacks (message, PSK) are cleared on each SSL.

The stage buffer and the plaintext scratch are shared by all transports: they must all run
in one thread (kite runs one event loop), and nothing runs between an OpenSSL call and the
end of its use of either but this module's own code.

``available()`` says whether this works here; ``kite.net.tlsconn`` falls back to the
event loop's TLS when it does not.

Rules of the transport (those of asyncio's transports, where not said otherwise):

* ``write()`` encrypts at once and sends what the socket takes; the rest waits for the
  socket to be writable.  ``get_write_buffer_size()`` counts encrypted bytes waiting;
  ``pause_writing``/``resume_writing`` follow the high and low water marks.
* Reading stops at ``pause_reading()``; records OpenSSL already holds are delivered after
  ``resume_reading()`` without waiting for the socket.
* A TLS 1.2 renegotiation is declined (``OP_NO_RENEGOTIATION``; kite's peers never ask,
  TLS 1.3 has none), and a protocol callback that raises is reported to the loop's
  exception handler and resets the connection (``connection_made``: the handshake fails).
* TLS has no half-close: ``can_write_eof()`` is False.  The peer's end (``close_notify`` or
  the TCP end without it, as the event loop's TLS takes it) calls ``eof_received()``; if it
  returns false the transport closes.
* ``close()`` sends what is buffered, then ``close_notify``, then reads (and drops) until
  the peer's end (its ``close_notify`` or TCP end), and closes the socket: closing it while
  the peer still sends would reset the connection, and a peer that has not read everything
  yet would lose it.  The TCP end is not sent before (uvloop's TLS drops what it holds
  unread when it sees it).  All of that within ``SHUTDOWN_TIMEOUT`` seconds, then the
  socket is closed anyway.  ``abort()`` closes the socket at once.  ``connection_lost``
  comes in a later loop turn, once the socket is closed.
"""

import asyncio as _asyncio
import errno as _errno
import socket as _socket
import ssl as _ssl

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.object cimport PyObject
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove


cdef extern from "errno.h" nogil:
    int EWOULDBLOCK


cdef extern from "sys/socket.h" nogil:
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    ssize_t recv(int fd, void* buf, size_t n, int flags)
    int MSG_NOSIGNAL


cdef extern from "Python.h":
    ctypedef struct PyObject_HEAD_T "PyObject":
        pass


# The head of CPython's PySSLContext (Modules/_ssl.c): the SSL_CTX pointer is its first
# field after the object header, in every CPython 3 release.
ctypedef struct _PySSLContext:
    PyObject_HEAD_T ob_base
    void* ctx


# -- OpenSSL constants (stable ABI values of OpenSSL 3) -------------------------------------------
cdef enum:
    SSL_ERROR_NONE = 0
    SSL_ERROR_SSL = 1
    SSL_ERROR_WANT_READ = 2
    SSL_ERROR_WANT_WRITE = 3
    SSL_ERROR_SYSCALL = 5
    SSL_ERROR_ZERO_RETURN = 6
    SSL_CTRL_MODE = 33
    SSL_CTRL_SET_TLSEXT_HOSTNAME = 55
    TLSEXT_NAMETYPE_host_name = 0
    SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER = 0x2
    SSL_MODE_AUTO_RETRY = 0x4
    SSL_MODE_RELEASE_BUFFERS = 0x10
    BIO_FLAGS_READ = 0x01
    BIO_FLAGS_RWS = 0x07
    BIO_FLAGS_SHOULD_RETRY = 0x08
    BIO_TYPE_SOURCE_SINK = 0x0400
    BIO_CTRL_FLUSH = 11
    BIO_CTRL_DUP = 12
    SSL_R_CERTIFICATE_VERIFY_FAILED = 134
    ERR_LIB_SSL = 20
    # Sizes.
    READ_BUFFER_LEN = 65536 + 512    # OpenSSL's receive buffer: 64 KiB of records a recv(2)
    SCRATCH_LEN = 65536              # plaintext for a protocol without get_buffer()
    READ_TURN_MAX = 1048576          # plaintext delivered per readable event at most
    WBUF_INITIAL = 65536             # the write buffer's first size (it is freed when empty)
    STAGE_KEEP = 4194304             # the stage is given back after use above this size


#: Seconds from close() until the socket is closed at the latest: for what is buffered to
#: go out and the peer to answer close_notify (asyncio's ssl_shutdown_timeout is 30).
SHUTDOWN_TIMEOUT = 10.0


# -- the functions, looked up in the library _ssl uses -------------------------------------------
ctypedef int (*bio_write_f)(void*, const char*, int) noexcept nogil
ctypedef int (*bio_read_f)(void*, char*, int) noexcept nogil
ctypedef long (*bio_ctrl_f)(void*, int, long, void*) noexcept nogil
ctypedef int (*bio_create_f)(void*) noexcept nogil

cdef struct Api:
    unsigned long (*OpenSSL_version_num)() noexcept nogil
    void* (*SSL_new)(void*) noexcept nogil
    void (*SSL_free)(void*) noexcept nogil
    void (*SSL_set_bio)(void*, void*, void*) noexcept nogil
    void (*SSL_set_accept_state)(void*) noexcept nogil
    void (*SSL_set_connect_state)(void*) noexcept nogil
    int (*SSL_do_handshake)(void*) noexcept nogil
    int (*SSL_read_ex)(void*, void*, size_t, size_t*) noexcept nogil
    int (*SSL_write_ex)(void*, const void*, size_t, size_t*) noexcept nogil
    int (*SSL_get_error)(const void*, int) noexcept nogil
    int (*SSL_shutdown)(void*) noexcept nogil
    void (*SSL_set_read_ahead)(void*, int) noexcept nogil
    void (*SSL_set_default_read_buffer_len)(void*, size_t) noexcept nogil
    long (*SSL_ctrl)(void*, int, long, void*) noexcept nogil
    uint64_t (*SSL_set_options)(void*, uint64_t) noexcept nogil
    void (*SSL_set_msg_callback)(void*, void*) noexcept nogil
    void (*SSL_set_psk_client_callback)(void*, void*) noexcept nogil
    void (*SSL_set_psk_server_callback)(void*, void*) noexcept nogil
    int (*SSL_has_pending)(const void*) noexcept nogil
    int (*SSL_set1_host)(void*, const char*) noexcept nogil
    void* (*SSL_get0_param)(void*) noexcept nogil
    int (*X509_VERIFY_PARAM_set1_ip_asc)(void*, const char*) noexcept nogil
    void* (*SSL_get1_peer_certificate)(const void*) noexcept nogil
    int (*i2d_X509)(const void*, unsigned char**) noexcept nogil
    void (*X509_free)(void*) noexcept nogil
    void (*CRYPTO_free)(void*, const char*, int) noexcept nogil
    const char* (*SSL_get_version)(const void*) noexcept nogil
    const void* (*SSL_get_current_cipher)(const void*) noexcept nogil
    const char* (*SSL_CIPHER_get_name)(const void*) noexcept nogil
    const char* (*SSL_CIPHER_get_version)(const void*) noexcept nogil
    int (*SSL_CIPHER_get_bits)(const void*, int*) noexcept nogil
    void (*SSL_get0_alpn_selected)(const void*, const unsigned char**, unsigned int*) noexcept nogil
    const char* (*SSL_get_servername)(const void*, int) noexcept nogil
    long (*SSL_get_verify_result)(const void*) noexcept nogil
    const char* (*X509_verify_cert_error_string)(long) noexcept nogil
    uint64_t (*SSL_CTX_get_options)(const void*) noexcept nogil
    int (*SSL_CTX_get_verify_mode)(const void*) noexcept nogil
    int (*SSL_CTX_set_ciphersuites)(void*, const char*) noexcept nogil
    unsigned long (*ERR_get_error)() noexcept nogil
    void (*ERR_clear_error)() noexcept nogil
    const char* (*ERR_reason_error_string)(unsigned long) noexcept nogil
    const char* (*ERR_lib_error_string)(unsigned long) noexcept nogil
    void (*BIO_set_flags)(void*, int) noexcept nogil
    void (*BIO_clear_flags)(void*, int) noexcept nogil
    int (*BIO_meth_set_read)(void*, bio_read_f) noexcept nogil
    void* (*BIO_new)(const void*) noexcept nogil
    void (*BIO_free_all)(void*) noexcept nogil
    int (*BIO_get_new_index)() noexcept nogil
    void* (*BIO_meth_new)(int, const char*) noexcept nogil
    int (*BIO_meth_set_write)(void*, bio_write_f) noexcept nogil
    int (*BIO_meth_set_ctrl)(void*, bio_ctrl_f) noexcept nogil
    int (*BIO_meth_set_create)(void*, bio_create_f) noexcept nogil
    void (*BIO_set_data)(void*, void*) noexcept nogil
    void* (*BIO_get_data)(void*) noexcept nogil
    void (*BIO_set_init)(void*, int) noexcept nogil

cdef Api api
cdef void* out_method = NULL     # the BIO_METHOD of the write buffer
cdef void* in_method = NULL      # the BIO_METHOD of the socket reader
cdef char scratch[SCRATCH_LEN]
cdef object _why_not = "not initialised"
cdef uint64_t _ssl_options = 0     # set on every SSL: see _load_api's caller


cdef int _load(object handle, const char* name, void** slot) except -1:
    import ctypes
    try:
        function = getattr(handle, name.decode())
    except AttributeError:
        raise ImportError(f"OpenSSL function {name.decode()} not found in the library of _ssl")
    slot[0] = <void*><size_t>ctypes.cast(function, ctypes.c_void_p).value
    return 0


cdef int _load_api() except -1:
    # ctypes opens _ssl's own library again (the loader hands back the one loaded), and its
    # lookups search that library's dependencies: the libssl and libcrypto _ssl uses.  (No
    # dlopen of our own: it would tie the module to a recent glibc's symbol versions.)
    import ctypes
    import _ssl as _ssl_module
    path = getattr(_ssl_module, "__file__", None)
    try:
        handle = ctypes.CDLL(path)  # None: _ssl is built into the interpreter
    except OSError as exc:
        raise ImportError(f"cannot reach the library of _ssl: {exc}")
    _load(handle, b"OpenSSL_version_num", <void**>&api.OpenSSL_version_num)
    _load(handle, b"SSL_new", <void**>&api.SSL_new)
    _load(handle, b"SSL_free", <void**>&api.SSL_free)
    _load(handle, b"SSL_set_bio", <void**>&api.SSL_set_bio)
    _load(handle, b"SSL_set_accept_state", <void**>&api.SSL_set_accept_state)
    _load(handle, b"SSL_set_connect_state", <void**>&api.SSL_set_connect_state)
    _load(handle, b"SSL_do_handshake", <void**>&api.SSL_do_handshake)
    _load(handle, b"SSL_read_ex", <void**>&api.SSL_read_ex)
    _load(handle, b"SSL_write_ex", <void**>&api.SSL_write_ex)
    _load(handle, b"SSL_get_error", <void**>&api.SSL_get_error)
    _load(handle, b"SSL_shutdown", <void**>&api.SSL_shutdown)
    _load(handle, b"SSL_set_read_ahead", <void**>&api.SSL_set_read_ahead)
    _load(handle, b"SSL_set_default_read_buffer_len",
          <void**>&api.SSL_set_default_read_buffer_len)
    _load(handle, b"SSL_ctrl", <void**>&api.SSL_ctrl)
    _load(handle, b"SSL_set_options", <void**>&api.SSL_set_options)
    _load(handle, b"SSL_set_msg_callback", <void**>&api.SSL_set_msg_callback)
    _load(handle, b"SSL_set_psk_client_callback", <void**>&api.SSL_set_psk_client_callback)
    _load(handle, b"SSL_set_psk_server_callback", <void**>&api.SSL_set_psk_server_callback)
    _load(handle, b"SSL_has_pending", <void**>&api.SSL_has_pending)
    _load(handle, b"SSL_set1_host", <void**>&api.SSL_set1_host)
    _load(handle, b"SSL_get0_param", <void**>&api.SSL_get0_param)
    _load(handle, b"X509_VERIFY_PARAM_set1_ip_asc", <void**>&api.X509_VERIFY_PARAM_set1_ip_asc)
    _load(handle, b"SSL_get1_peer_certificate", <void**>&api.SSL_get1_peer_certificate)
    _load(handle, b"i2d_X509", <void**>&api.i2d_X509)
    _load(handle, b"X509_free", <void**>&api.X509_free)
    _load(handle, b"CRYPTO_free", <void**>&api.CRYPTO_free)
    _load(handle, b"SSL_get_version", <void**>&api.SSL_get_version)
    _load(handle, b"SSL_get_current_cipher", <void**>&api.SSL_get_current_cipher)
    _load(handle, b"SSL_CIPHER_get_name", <void**>&api.SSL_CIPHER_get_name)
    _load(handle, b"SSL_CIPHER_get_version", <void**>&api.SSL_CIPHER_get_version)
    _load(handle, b"SSL_CIPHER_get_bits", <void**>&api.SSL_CIPHER_get_bits)
    _load(handle, b"SSL_get0_alpn_selected", <void**>&api.SSL_get0_alpn_selected)
    _load(handle, b"SSL_get_servername", <void**>&api.SSL_get_servername)
    _load(handle, b"SSL_get_verify_result", <void**>&api.SSL_get_verify_result)
    _load(handle, b"X509_verify_cert_error_string", <void**>&api.X509_verify_cert_error_string)
    _load(handle, b"SSL_CTX_get_options", <void**>&api.SSL_CTX_get_options)
    _load(handle, b"SSL_CTX_get_verify_mode", <void**>&api.SSL_CTX_get_verify_mode)
    _load(handle, b"SSL_CTX_set_ciphersuites", <void**>&api.SSL_CTX_set_ciphersuites)
    _load(handle, b"ERR_get_error", <void**>&api.ERR_get_error)
    _load(handle, b"ERR_clear_error", <void**>&api.ERR_clear_error)
    _load(handle, b"ERR_reason_error_string", <void**>&api.ERR_reason_error_string)
    _load(handle, b"ERR_lib_error_string", <void**>&api.ERR_lib_error_string)
    _load(handle, b"BIO_set_flags", <void**>&api.BIO_set_flags)
    _load(handle, b"BIO_clear_flags", <void**>&api.BIO_clear_flags)
    _load(handle, b"BIO_meth_set_read", <void**>&api.BIO_meth_set_read)
    _load(handle, b"BIO_new", <void**>&api.BIO_new)
    _load(handle, b"BIO_free_all", <void**>&api.BIO_free_all)
    _load(handle, b"BIO_get_new_index", <void**>&api.BIO_get_new_index)
    _load(handle, b"BIO_meth_new", <void**>&api.BIO_meth_new)
    _load(handle, b"BIO_meth_set_write", <void**>&api.BIO_meth_set_write)
    _load(handle, b"BIO_meth_set_ctrl", <void**>&api.BIO_meth_set_ctrl)
    _load(handle, b"BIO_meth_set_create", <void**>&api.BIO_meth_set_create)
    _load(handle, b"BIO_set_data", <void**>&api.BIO_set_data)
    _load(handle, b"BIO_get_data", <void**>&api.BIO_get_data)
    _load(handle, b"BIO_set_init", <void**>&api.BIO_set_init)
    version = api.OpenSSL_version_num()
    if version != _ssl.OPENSSL_VERSION_NUMBER:
        raise ImportError(f"OpenSSL {version:#x} found, Python's ssl reports "
                          f"{_ssl.OPENSSL_VERSION_NUMBER:#x}")
    if version < 0x30000000:
        raise ImportError(f"OpenSSL 3 needed, {_ssl.OPENSSL_VERSION} found")
    global out_method, in_method
    out_method = _bio_method(b"kite out")
    api.BIO_meth_set_write(out_method, _out_write)
    in_method = _bio_method(b"kite in")
    api.BIO_meth_set_read(in_method, _in_read)
    return 0


cdef void* _bio_method(const char* name) except NULL:
    """A new BIO_METHOD with the control and create functions both of ours share."""
    cdef void* method = api.BIO_meth_new(api.BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, name)
    if method == NULL:
        raise ImportError("BIO_meth_new failed")
    api.BIO_meth_set_ctrl(method, _bio_ctrl)
    api.BIO_meth_set_create(method, _bio_create)
    return method


try:
    # The peer's TCP end without close_notify is an end (as the event loop's TLS takes it);
    # no renegotiation (TLS 1.2: a write in the middle of one would fail).
    _ssl_options = _ssl.OP_IGNORE_UNEXPECTED_EOF | _ssl.OP_NO_RENEGOTIATION
    _load_api()
    _why_not = None
except (ImportError, AttributeError, OSError) as _exc:
    _why_not = str(_exc)


def available():
    """None if this transport works here, else why not (a sentence)."""
    return _why_not


def usable(context):
    """Whether ``context`` can serve this transport: it must have no SNI callback and no
    key-log file (OpenSSL calls those with the SSL of a connection, and Python's expect its
    own socket object there), now and as long as a connection uses it."""
    return context.sni_callback is None and not getattr(context, "keylog_filename", None)


# -- the write buffer and its BIO -----------------------------------------------------------------
cdef struct OutBuf:
    char* data
    size_t start     # first byte not yet sent
    size_t end       # one past the last byte
    size_t cap


cdef struct InSock:
    int fd
    bint drained     # the last recv(2) returned less than asked: the socket had no more


cdef int _in_read(void* bio, char* buf, int n) noexcept nogil:
    """OpenSSL reads the socket (as much as its buffer takes: read-ahead is on); notes
    whether the socket gave less than asked, i.e. had nothing more for now."""
    cdef InSock* sock = <InSock*>api.BIO_get_data(bio)
    cdef ssize_t got
    api.BIO_clear_flags(bio, BIO_FLAGS_RWS | BIO_FLAGS_SHOULD_RETRY)
    if n <= 0:
        return 0
    while True:
        got = recv(sock.fd, buf, <size_t>n, 0)
        if got >= 0:
            sock.drained = got < n
            return <int>got
        if errno == EINTR:
            continue
        if errno == EAGAIN or errno == EWOULDBLOCK:
            sock.drained = True
            api.BIO_set_flags(bio, BIO_FLAGS_READ | BIO_FLAGS_SHOULD_RETRY)
        return -1


# What OpenSSL writes goes first to one buffer shared by all transports, the stage, when
# the transport's own buffer is empty; the transport sends it right after the OpenSSL call
# that wrote it, and copies into its own buffer only what the socket did not take.  So a
# write the socket takes at once costs no allocation and no copy besides OpenSSL's own.
# Rule: the stage is owned by one transport at a time, only between an OpenSSL call and
# that transport's next _send() (or its end), which empties and releases it.
cdef OutBuf stage
cdef OutBuf* stage_owner = NULL


cdef int _bio_create(void* bio) noexcept nogil:
    return 1


cdef int _out_reserve(OutBuf* out, size_t n) noexcept nogil:
    """Room for ``n`` more bytes at the end (0), or -1 when memory is short."""
    cdef size_t need, cap
    cdef char* grown
    if out.end + n <= out.cap:
        return 0
    if out.start > 0:
        memmove(out.data, out.data + out.start, out.end - out.start)
        out.end -= out.start
        out.start = 0
    need = out.end + n
    if need <= out.cap:
        return 0
    cap = out.cap * 2 if out.cap else WBUF_INITIAL
    while cap < need:
        cap *= 2
    grown = <char*>realloc(out.data, cap)
    if grown == NULL:
        return -1
    out.data = grown
    out.cap = cap
    return 0


cdef inline size_t _sealed_size(size_t n) noexcept nogil:
    """At most what ``n`` bytes of plaintext take as records (16 KiB each, a header and a
    tag: 22 bytes in TLS 1.3, 29 in TLS 1.2 with AES-GCM; 64 leaves room for any AEAD)."""
    return n + (n // 16384 + 1) * 64


cdef int _out_write(void* bio, const char* data, int n) noexcept nogil:
    """OpenSSL's output (records, alerts) appended to the transport's buffer; never blocks."""
    global stage_owner
    cdef OutBuf* out = <OutBuf*>api.BIO_get_data(bio)
    if n <= 0:
        return 0
    if stage_owner == out or (stage_owner == NULL and out.end == out.start):
        stage_owner = out
        out = &stage
    if _out_reserve(out, <size_t>n) < 0:
        return -1
    memcpy(out.data + out.end, data, n)
    out.end += n
    return n


cdef inline OutBuf* _out_target(OutBuf* own) noexcept nogil:
    """Where the next records of the transport whose buffer is ``own`` will go."""
    if stage_owner == own or (stage_owner == NULL and own.end == own.start):
        return &stage
    return own


cdef void _unstage(OutBuf* own) noexcept nogil:
    """The stage, if ``own``'s transport holds it, emptied and released (its bytes lost)."""
    global stage_owner
    if stage_owner == own:
        stage.start = stage.end = 0
        stage_owner = NULL
        if stage.cap > STAGE_KEEP:
            free(stage.data)
            stage.data = NULL
            stage.cap = 0


cdef long _bio_ctrl(void* bio, int cmd, long num, void* ptr) noexcept nogil:
    if cmd == BIO_CTRL_FLUSH or cmd == BIO_CTRL_DUP:
        return 1
    return 0


# -- errors ---------------------------------------------------------------------------------------
cdef object _ssl_error(void* ssl, str what):
    """The error OpenSSL queued, as ``ssl.SSLError`` (``reason`` and ``library`` set as
    Python's ``ssl`` sets them); the queue is left empty."""
    cdef unsigned long code = api.ERR_get_error()
    cdef unsigned long last = code
    cdef const char* text
    while last:
        code = last
        last = api.ERR_get_error()
    if code == 0:
        return _ssl.SSLError(f"{what}: TLS failed without a reason")
    text = api.ERR_reason_error_string(code)
    reason = text.decode("ascii", "replace") if text != NULL else f"error {code:#x}"
    text = api.ERR_lib_error_string(code)
    library = text.decode("ascii", "replace").upper() if text != NULL else "SSL"
    if library.endswith(" ROUTINES"):
        library = library[:len(library) - 9]
    mnemonic = reason.upper().replace(" ", "_")
    if ((code >> 23) & 0xFF) == ERR_LIB_SSL and (code & 0x7FFFFF) == \
            SSL_R_CERTIFICATE_VERIFY_FAILED and ssl != NULL:
        verify_code = api.SSL_get_verify_result(ssl)
        text = api.X509_verify_cert_error_string(verify_code)
        verify_message = text.decode("ascii", "replace") if text != NULL else ""
        exc = _ssl.SSLCertVerificationError(
            1, f"[{library}: {mnemonic}] {reason}: {verify_message}")
        exc.verify_code = verify_code
        exc.verify_message = verify_message
    else:
        exc = _ssl.SSLError(1, f"[{library}: {mnemonic}] {reason}")
    exc.reason = mnemonic
    exc.library = library
    return exc


# -- what ssl_object answers ----------------------------------------------------------------------
class TLSInfo:
    """What ``get_extra_info("ssl_object")`` answers: the handshake's results, read once
    when it completed (the subset of ``ssl.SSLObject`` kite and its peers' checks use)."""

    def __init__(self, server_side, server_hostname, version, cipher, alpn, peer_der, context):
        self.server_side = server_side
        self.server_hostname = server_hostname
        self._version = version
        self._cipher = cipher
        self._alpn = alpn
        self._peer_der = peer_der
        self.context = context

    def version(self):
        return self._version

    def cipher(self):
        return self._cipher

    def selected_alpn_protocol(self):
        return self._alpn

    def compression(self):
        return None

    def getpeercert(self, binary_form=False):
        if binary_form:
            return self._peer_der
        if self._peer_der is None:
            return None
        raise ValueError("this TLS transport gives the peer's certificate in binary form only")

    def __repr__(self):
        return f"<TLSInfo {self._version} {self._cipher[0] if self._cipher else ''}>"


cdef void* _ctx_of(object context) except NULL:
    """The SSL_CTX inside ``context``, for a connection of this transport."""
    if isinstance(context, _ssl.SSLContext) and not usable(context):
        raise ValueError("a context with an SNI or key-log callback needs Python's own TLS "
                         "objects")
    return _ssl_ctx(context)


def set_ciphersuites(context, str suites not None):
    """Set the TLS 1.3 cipher suites of ``context``, in order of preference (OpenSSL's
    ``SSL_CTX_set_ciphersuites``; ``ssl.SSLContext.set_ciphers`` covers TLS 1.2 only).
    Every name must be one OpenSSL knows, else ``ValueError`` and the context is as it was
    (OpenSSL itself would drop unknown names, and take "" as TLS 1.3 off).
    ``RuntimeError`` when this module is off (``available()``)."""
    if _why_not is not None:
        raise RuntimeError(f"kite._tls is off: {_why_not}")
    cdef void* ctx = _ssl_ctx(context)
    names = suites.split(":")
    if not suites or "\0" in suites or not all(names):
        raise ValueError(f"not a list of TLS 1.3 cipher suites: {suites!r}")
    before = ":".join(c["name"] for c in context.get_ciphers() if c.get("protocol") == "TLSv1.3")
    cdef bytes raw = suites.encode("ascii")
    if api.SSL_CTX_set_ciphersuites(ctx, raw) != 1:
        api.ERR_clear_error()
        raise ValueError(f"OpenSSL takes none of the TLS 1.3 cipher suites {suites!r}")
    now = {c["name"] for c in context.get_ciphers() if c.get("protocol") == "TLSv1.3"}
    unknown = [name for name in names if name not in now]
    if unknown:
        if before:
            api.SSL_CTX_set_ciphersuites(ctx, before.encode("ascii"))
        api.ERR_clear_error()
        raise ValueError(f"OpenSSL does not know the TLS 1.3 cipher suites {unknown}")


cdef void* _ssl_ctx(object context, bint check_layout=False) except NULL:
    """The SSL_CTX inside ``context``, after checking that it is one.  ``check_layout``
    compares what OpenSSL and Python say of it, to prove the struct's layout: done once, at
    import (every context has the same layout; the comparison costs two enums a call)."""
    if not isinstance(context, _ssl.SSLContext):
        raise TypeError(f"an ssl.SSLContext is needed, not {type(context).__name__}")
    cdef void* ctx = (<_PySSLContext*><PyObject*>context).ctx
    if ctx == NULL:
        raise ValueError("the context has no SSL_CTX")
    # Python's CERT_NONE / CERT_OPTIONAL / CERT_REQUIRED are SSL_VERIFY_NONE, _PEER and
    # _PEER | _FAIL_IF_NO_PEER_CERT.
    if check_layout and (
            api.SSL_CTX_get_options(ctx) != <uint64_t>context.options
            or api.SSL_CTX_get_verify_mode(ctx) != (0, 1, 3)[int(context.verify_mode)]):
        raise RuntimeError("ssl.SSLContext's layout is not the one this module knows")
    return ctx


# -- the transport --------------------------------------------------------------------------------
cdef enum State:
    HANDSHAKE = 0
    OPEN = 1
    CLOSING = 2      # close() called: sending what is left, then close_notify
    CLOSED = 3


cdef class TLSTransport:
    """An asyncio transport (see the module docstring) over ``sock`` with TLS by ``context``.

    Made by :func:`kite.net.tlsconn.start_tls` (never directly): ``start()`` begins the
    handshake; ``waiter`` gets None when it completed, right after the protocol's
    ``connection_made``, or the exception that ended it.
    """

    cdef void* ssl
    cdef OutBuf out
    cdef InSock insock
    cdef int fd
    cdef State state
    cdef bint server_side
    cdef bint buffered          # the protocol has get_buffer/buffer_updated
    cdef bint reading_paused
    cdef bint reader_on         # add_reader in force
    cdef bint writer_on         # add_writer in force
    cdef bint protocol_paused   # pause_writing() called, resume_writing() not yet
    cdef bint eof               # the peer's end was seen
    cdef bint read_soon         # a _read_ready is scheduled
    cdef int held_err           # why reading ended, held while the protocol pauses reading
    cdef int held_code          # ... its errno (SSL_ERROR_SYSCALL)
    cdef object held_failure    # ... its exception (an OpenSSL error)
    cdef size_t high_water
    cdef size_t low_water
    cdef object loop
    cdef object sock
    cdef object protocol
    cdef object context
    cdef object waiter
    cdef object timer
    cdef object server_hostname
    cdef object info
    cdef dict extra
    cdef object _on_readable_cb
    cdef object _on_writable_cb
    cdef object _read_ready_cb

    def __cinit__(self):
        self.ssl = NULL
        self.out.data = NULL
        self.out.start = self.out.end = self.out.cap = 0
        self.fd = -1
        self.state = HANDSHAKE

    def __init__(self, loop, sock, context, protocol, waiter, *, bint server_side,
                 server_hostname=None):
        cdef void* ctx = _ctx_of(context)
        cdef void* rbio
        cdef void* wbio
        self.loop = loop
        self.sock = sock
        self.context = context
        self.protocol = protocol
        self.waiter = waiter
        self.server_side = server_side
        self.server_hostname = server_hostname
        self.high_water = 65536
        self.low_water = 16384
        self.extra = {"socket": sock, "sslcontext": context}
        self.buffered = isinstance(protocol, _asyncio.BufferedProtocol)
        self._on_readable_cb = self._on_readable
        self._on_writable_cb = self._on_writable
        self._read_ready_cb = self._read_ready
        self.fd = sock.fileno()
        if sock.gettimeout() != 0.0:  # Python knows; setblocking would ask the kernel again
            sock.setblocking(False)
        self.ssl = api.SSL_new(ctx)
        if self.ssl == NULL:
            raise MemoryError("SSL_new failed")
        self.insock.fd = self.fd
        self.insock.drained = False
        rbio = api.BIO_new(in_method)
        wbio = api.BIO_new(out_method)
        if rbio == NULL or wbio == NULL:
            if rbio != NULL:
                api.BIO_free_all(rbio)
            if wbio != NULL:
                api.BIO_free_all(wbio)
            raise MemoryError("BIO_new failed")
        api.BIO_set_data(wbio, &self.out)
        api.BIO_set_init(wbio, 1)
        api.BIO_set_data(rbio, &self.insock)
        api.BIO_set_init(rbio, 1)
        api.SSL_set_bio(self.ssl, rbio, wbio)
        api.SSL_ctrl(self.ssl, SSL_CTRL_MODE, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
                     | SSL_MODE_AUTO_RETRY | SSL_MODE_RELEASE_BUFFERS, NULL)
        api.SSL_set_options(self.ssl, _ssl_options)
        # Python's callbacks expect Python's own socket object on the SSL: the per-SSL ones
        # are cleared here; the SNI and key-log ones live in the context (_ctx_of refuses).
        api.SSL_set_msg_callback(self.ssl, NULL)
        api.SSL_set_psk_client_callback(self.ssl, NULL)
        api.SSL_set_psk_server_callback(self.ssl, NULL)
        api.SSL_set_read_ahead(self.ssl, 1)
        api.SSL_set_default_read_buffer_len(self.ssl, READ_BUFFER_LEN)
        if server_side:
            api.SSL_set_accept_state(self.ssl)
        else:
            self._set_client_names(context, server_hostname)
            api.SSL_set_connect_state(self.ssl)
        try:
            self.extra["peername"] = sock.getpeername()
            self.extra["sockname"] = sock.getsockname()
        except OSError:
            pass

    cdef _set_client_names(self, context, server_hostname):
        if not server_hostname:
            if context.check_hostname:
                raise ValueError("check_hostname requires server_hostname")
            return
        name = server_hostname.encode("idna") if isinstance(server_hostname, str) \
            else bytes(server_hostname)
        is_ip = True
        try:
            _socket.inet_pton(_socket.AF_INET6 if b":" in name else _socket.AF_INET, name.decode())
        except (OSError, UnicodeDecodeError):
            is_ip = False
        if not is_ip:
            api.SSL_ctrl(self.ssl, SSL_CTRL_SET_TLSEXT_HOSTNAME, TLSEXT_NAMETYPE_host_name,
                         <char*>name)
        if context.check_hostname:
            if is_ip:
                ok = api.X509_VERIFY_PARAM_set1_ip_asc(api.SSL_get0_param(self.ssl), name)
            else:
                ok = api.SSL_set1_host(self.ssl, name)
            if not ok:
                raise ValueError(f"cannot check the name {server_hostname!r}")

    def __dealloc__(self):
        _unstage(&self.out)
        if self.ssl != NULL:
            api.SSL_free(self.ssl)   # frees both BIOs; the socket BIO leaves the fd alone
            self.ssl = NULL
        if self.out.data != NULL:
            free(self.out.data)
            self.out.data = NULL

    # -- start and handshake ----------------------------------------------------------------------
    def start(self, handshake_timeout):
        """Begin the handshake (``handshake_timeout`` seconds at most)."""
        if self.ssl == NULL or self.state != HANDSHAKE or self.reader_on:
            raise RuntimeError("start() once, on a transport __init__ made")
        self.loop.add_reader(self.fd, self._on_readable_cb)
        self.reader_on = True
        if handshake_timeout is not None:
            self.timer = self.loop.call_later(handshake_timeout, self._handshake_timed_out)
        self._handshake()

    def _handshake_timed_out(self):
        self.timer = None
        if self.state == HANDSHAKE:
            self._fail(_asyncio.TimeoutError("no TLS handshake within the time allowed"))

    cdef _handshake(self):
        cdef int r, err, code
        api.ERR_clear_error()
        r = api.SSL_do_handshake(self.ssl)
        err = api.SSL_get_error(self.ssl, r) if r != 1 else SSL_ERROR_NONE
        code = errno if err == SSL_ERROR_SYSCALL else 0
        if not self._send():  # the alert, if it failed
            return
        if r == 1:
            self._handshake_done()
            return
        if err == SSL_ERROR_WANT_READ or err == SSL_ERROR_WANT_WRITE:
            return
        if err == SSL_ERROR_SYSCALL or err == SSL_ERROR_ZERO_RETURN:
            api.ERR_clear_error()
            self._fail(OSError(code, _errno.errorcode.get(code, str(code))) if code else
                       ConnectionResetError(_errno.ECONNRESET,
                                            "the peer closed the connection in the handshake"))
            return
        self._fail(_ssl_error(self.ssl, "handshake"))

    cdef _handshake_done(self):
        cdef const unsigned char* alpn = NULL
        cdef unsigned int alpn_len = 0
        cdef const void* cipher
        cdef const char* text
        cdef void* cert
        cdef unsigned char* der = NULL
        cdef int der_len
        cdef int bits = 0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        api.SSL_get0_alpn_selected(self.ssl, &alpn, &alpn_len)
        alpn_name = alpn[:alpn_len].decode("ascii", "replace") if alpn_len else None
        cipher = api.SSL_get_current_cipher(self.ssl)
        cipher_info = None
        if cipher != NULL:
            bits = api.SSL_CIPHER_get_bits(cipher, NULL)
            cipher_info = (api.SSL_CIPHER_get_name(cipher).decode(),
                           api.SSL_CIPHER_get_version(cipher).decode(), bits)
        peer_der = None
        cert = api.SSL_get1_peer_certificate(self.ssl)
        if cert != NULL:
            der_len = api.i2d_X509(cert, &der)
            if der_len > 0 and der != NULL:
                peer_der = PyBytes_FromStringAndSize(<char*>der, der_len)
            if der != NULL:
                api.CRYPTO_free(der, b"_tls.pyx", 0)  # OPENSSL_free
            api.X509_free(cert)
        hostname = self.server_hostname
        if self.server_side:
            text = api.SSL_get_servername(self.ssl, TLSEXT_NAMETYPE_host_name)
            hostname = text.decode("ascii", "replace") if text != NULL else None
        self.info = TLSInfo(self.server_side, hostname,
                            api.SSL_get_version(self.ssl).decode(), cipher_info, alpn_name,
                            peer_der, self.context)
        self.extra["ssl_object"] = self.info
        self.extra["peercert"] = None
        self.extra["cipher"] = cipher_info
        self.extra["compression"] = None
        self.state = OPEN
        waiter, self.waiter = self.waiter, None
        try:
            self.protocol.connection_made(self)
        except BaseException as exc:
            if waiter is not None and not waiter.done():
                waiter.set_exception(exc)
            raise
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.state == OPEN and not self.reading_paused and api.SSL_has_pending(self.ssl):
            self._read_ready()

    cdef _fail(self, exc):
        """The handshake failed: the socket is closed, the waiter gets ``exc``."""
        waiter, self.waiter = self.waiter, None
        _unstage(&self.out)
        self._stop_io()
        self.state = CLOSED
        self.sock.close()
        self._on_readable_cb = self._on_writable_cb = self._read_ready_cb = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    # -- reading ----------------------------------------------------------------------------------
    def _on_readable(self):
        if self.ssl == NULL:
            return
        try:
            if self.state == HANDSHAKE:
                self._handshake()
            elif self.state == OPEN:
                self._read()
            elif self.state == CLOSING:
                self._drain()
        except (SystemExit, KeyboardInterrupt):
            self._restage()
            raise
        except BaseException as exc:
            self._protocol_failed(exc)

    def _read_ready(self):
        """What OpenSSL holds already, read without waiting for the socket (scheduled)."""
        self.read_soon = False
        self._on_readable()

    cdef _restage(self):
        """An exception is leaving with records on the stage: they move to this transport's
        own buffer (sent when the socket is writable), and the stage is free again."""
        cdef size_t left
        if stage_owner != &self.out:
            return
        left = stage.end - stage.start
        if left and self.state != CLOSED and _out_reserve(&self.out, left) == 0:
            memcpy(self.out.data + self.out.end, stage.data + stage.start, left)
            self.out.end += left
            _unstage(&self.out)
            if self.loop is not None and not self.writer_on:
                self.writer_on = True
                self.loop.add_writer(self.fd, self._on_writable_cb)
        else:
            _unstage(&self.out)

    cdef _protocol_failed(self, exc):
        """A protocol callback raised: reported to the loop, the connection reset."""
        self.loop.call_exception_handler({
            "message": "Fatal error: a protocol callback of a TLS transport raised",
            "exception": exc, "transport": self, "protocol": self.protocol})
        if self.state == HANDSHAKE:
            self._fail(exc)
        else:
            self._force_close(exc)

    cdef _read(self):
        cdef Py_buffer view
        cdef size_t n = 0
        cdef size_t got
        cdef size_t total = 0
        cdef int r, err, code
        cdef bint reading = True
        cdef bint batch
        if self.held_err and self.state == OPEN and not self.reading_paused:
            err, code, failure = self.held_err, self.held_code, self.held_failure
            self.held_err = 0
            self.held_failure = None
            self._read_ended(err, code, failure)
            reading = False  # the end is all there was (eof_received may keep it open)
        while reading and self.state == OPEN and not self.reading_paused:
            api.ERR_clear_error()
            got = 0
            r = 1
            if self.buffered:
                # A protocol whose brake allows a whole loan per call asks for batches
                # (read_batch): a kite tunnel (its peer keeps kite's per-stream window), a
                # stream's local side (its window).  Without it, a record a call: a tunnel
                # to pagekite.py, whose brake stops reading the tunnel between two calls
                # when a local socket is full.  Asked at each loan: a protocol may hand the
                # transport to another in buffer_updated.
                batch = getattr(self.protocol, "read_batch", False)
                buf = self.protocol.get_buffer(-1)
                PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE)
                try:
                    if view.len == 0:
                        raise RuntimeError("get_buffer() returned an empty buffer")
                    # Batched: records while the loan has room and OpenSSL or the socket
                    # has more.  A record holds 16 KiB at most, and one buffer_updated() for
                    # all of them is one protocol call where a bulk stream made one a record.
                    while True:
                        r = api.SSL_read_ex(self.ssl, <char*>view.buf + got,
                                            <size_t>view.len - got, &n)
                        if r != 1:
                            break
                        got += n
                        if not batch or got == <size_t>view.len or (
                                self.insock.drained and not api.SSL_has_pending(self.ssl)):
                            break
                finally:
                    PyBuffer_Release(&view)
            else:
                r = api.SSL_read_ex(self.ssl, scratch, SCRATCH_LEN, &n)
                if r == 1:
                    got = n
            # Why a read stopped is taken from OpenSSL now: the protocol's callback below
            # may use OpenSSL (another transport's write clears the error queue).
            err = SSL_ERROR_NONE
            code = 0
            failure = None
            if r != 1:
                err = api.SSL_get_error(self.ssl, r)
                if err == SSL_ERROR_SYSCALL:
                    code = errno
                    api.ERR_clear_error()
                elif err != SSL_ERROR_WANT_READ and err != SSL_ERROR_WANT_WRITE and \
                        err != SSL_ERROR_ZERO_RETURN:
                    failure = _ssl_error(self.ssl, "read")
            if got:
                total += got
                if self.buffered:
                    self.protocol.buffer_updated(got)
                else:
                    self.protocol.data_received(PyBytes_FromStringAndSize(scratch, got))
                if self.state != OPEN:
                    break  # the protocol closed the transport
            if r == 1:
                if total >= READ_TURN_MAX:
                    if not self.read_soon:
                        self.read_soon = True
                        self.loop.call_soon(self._read_ready_cb)
                    break
                if self.insock.drained and not api.SSL_has_pending(self.ssl):
                    break  # the socket had no more: no recv(2) just to hear EAGAIN
                continue
            if err == SSL_ERROR_WANT_READ or err == SSL_ERROR_WANT_WRITE:
                break
            if self.reading_paused:
                # The end came with the last records, and the protocol paused reading on
                # them: it hears of the end once it reads again (resume_reading).
                self.held_err, self.held_code, self.held_failure = err, code, failure
                break
            self._read_ended(err, code, failure)
            break
        if self.state == OPEN:
            if not self.writer_on:
                self._send()  # what reading made OpenSSL send (a key update's answer)
        else:
            _unstage(&self.out)

    cdef _read_ended(self, int err, int code, failure):
        """Reading ended for good: the peer's close_notify or end of stream, or an error."""
        if err == SSL_ERROR_ZERO_RETURN:
            self._on_eof()
        elif err == SSL_ERROR_SYSCALL:
            if code == 0:
                self._on_eof()
            else:
                self._force_close(OSError(code, _errno.errorcode.get(code, str(code))))
        else:
            self._force_close(failure)

    cdef _drain(self):
        """Closing: what the peer still sends is read and dropped, until its end."""
        cdef size_t n = 0
        cdef size_t total = 0
        cdef int r, err
        while self.state == CLOSING:
            api.ERR_clear_error()
            r = api.SSL_read_ex(self.ssl, scratch, SCRATCH_LEN, &n)
            if r == 1:
                total += n
                if total >= READ_TURN_MAX:
                    _unstage(&self.out)
                    return  # more in a later turn (the reader is on)
                continue
            err = api.SSL_get_error(self.ssl, r)
            api.ERR_clear_error()
            _unstage(&self.out)  # an answer to what came while closing is not needed
            if err == SSL_ERROR_WANT_READ or err == SSL_ERROR_WANT_WRITE:
                return
            self.eof = True  # its end, or an error: nothing more will come
            self._stop_reading()
            if self.out.end == self.out.start:
                self._force_close(None)
            return

    cdef _on_eof(self):
        self.eof = True
        self._stop_reading()
        if self.state != OPEN:
            return
        keep_open = self.protocol.eof_received()
        if not keep_open and self.state == OPEN:
            self.close()

    cdef _stop_reading(self):
        if self.reader_on:
            self.reader_on = False
            self.loop.remove_reader(self.fd)

    def pause_reading(self):
        if self.state >= CLOSING or self.reading_paused:
            return
        self.reading_paused = True
        self._stop_reading()

    def resume_reading(self):
        if self.state >= CLOSING or not self.reading_paused:
            return
        self.reading_paused = False
        if self.eof:
            return
        self.loop.add_reader(self.fd, self._on_readable_cb)
        self.reader_on = True
        if (self.held_err or api.SSL_has_pending(self.ssl)) and not self.read_soon:
            self.read_soon = True
            self.loop.call_soon(self._read_ready_cb)

    def is_reading(self):
        return self.state == OPEN and not self.reading_paused and not self.eof

    # -- writing ----------------------------------------------------------------------------------
    def write(self, data):
        cdef Py_buffer view
        if self.state != OPEN:
            return  # closing or closed: dropped, as asyncio's transports do
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if view.len == 0:
                return
            # Room for all the records at once: no copying while the buffer grows.
            _out_reserve(_out_target(&self.out), _sealed_size(<size_t>view.len))
            if not self._encrypt(<const char*>view.buf, <size_t>view.len):
                return
        finally:
            PyBuffer_Release(&view)
        if not self.writer_on:
            if not self._send():
                return
        self._check_high_water()

    def writelines(self, list_of_data):
        cdef Py_buffer view
        cdef size_t total = 0
        if self.state != OPEN:
            return
        # Every piece as bytes first (any iterable; a piece that is no contiguous buffer
        # fails here, before anything is encrypted).
        views = [memoryview(data).cast("B") for data in list_of_data]
        for piece in views:
            total += len(piece)
        _out_reserve(_out_target(&self.out), _sealed_size(total))
        try:
            for piece in views:
                PyObject_GetBuffer(piece, &view, PyBUF_SIMPLE)
                try:
                    if view.len and not self._encrypt(<const char*>view.buf, <size_t>view.len):
                        return
                finally:
                    PyBuffer_Release(&view)
        except BaseException:
            self._restage()  # what was encrypted goes out, in order, when writable
            raise
        if not self.writer_on:
            if not self._send():
                return
        self._check_high_water()


    cdef bint _encrypt(self, const char* data, size_t n):
        cdef size_t written = 0
        cdef int r
        api.ERR_clear_error()
        r = api.SSL_write_ex(self.ssl, data, n, &written)
        if r != 1 or written != n:
            self._force_close(_ssl_error(self.ssl, "write"))
            return False
        return True

    cdef bint _send(self):
        """Send what the stage (if this transport holds it) and the buffer hold, as far as
        the socket takes it; False if the transport was closed by an error."""
        cdef ssize_t sent
        cdef int code
        cdef size_t left
        if stage_owner == &self.out:
            # The own buffer is empty (the stage is used only then): what the socket does
            # not take moves there.
            while stage.end > stage.start:
                sent = send(self.fd, stage.data + stage.start, stage.end - stage.start,
                            MSG_NOSIGNAL)
                if sent < 0:
                    code = errno
                    if code == EINTR:
                        continue
                    if code == EAGAIN or code == EWOULDBLOCK:
                        break
                    _unstage(&self.out)
                    exc = OSError(code, _errno.errorcode.get(code, str(code)))
                    if self.state == HANDSHAKE:
                        self._fail(exc)
                    else:
                        self._force_close(exc)
                    return False
                stage.start += <size_t>sent
            left = stage.end - stage.start
            if left:
                if _out_reserve(&self.out, left) < 0:
                    _unstage(&self.out)  # records lost: the connection cannot go on
                    self._force_close(MemoryError("no memory for the TLS write buffer"))
                    return False
                memcpy(self.out.data + self.out.end, stage.data + stage.start, left)
                self.out.end += left
            _unstage(&self.out)
            if not left:
                return True
        while self.out.end > self.out.start:
            sent = send(self.fd, self.out.data + self.out.start, self.out.end - self.out.start,
                        MSG_NOSIGNAL)
            if sent < 0:
                code = errno
                if code == EINTR:
                    continue
                if code == EAGAIN or code == EWOULDBLOCK:
                    if not self.writer_on:
                        self.writer_on = True
                        self.loop.add_writer(self.fd, self._on_writable_cb)
                    return True
                exc = OSError(code, _errno.errorcode.get(code, str(code)))
                if self.state == HANDSHAKE:
                    self._fail(exc)
                else:
                    self._force_close(exc)
                return False
            self.out.start += <size_t>sent
        # Sent: the buffer is given back, so that an idle connection holds no buffer (nor does
        # OpenSSL's: SSL_MODE_RELEASE_BUFFERS).
        self.out.start = self.out.end = 0
        free(self.out.data)
        self.out.data = NULL
        self.out.cap = 0
        if self.writer_on:
            self.writer_on = False
            self.loop.remove_writer(self.fd)
        return True

    def _on_writable(self):
        try:
            self._written()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._protocol_failed(exc)

    cdef _written(self):
        if self.state == CLOSED:
            return
        if not self._send():
            return
        if self.state == HANDSHAKE:
            return
        if self.protocol_paused and self.out.end - self.out.start <= self.low_water:
            self.protocol_paused = False
            try:
                self.protocol.resume_writing()
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._report(exc, "resume_writing")
        if self.state == CLOSING and self.out.end == self.out.start:
            self._sent_all()

    cdef _check_high_water(self):
        if not self.protocol_paused and self.out.end - self.out.start > self.high_water:
            self.protocol_paused = True
            try:
                self.protocol.pause_writing()
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._report(exc, "pause_writing")

    cdef _report(self, exc, what):
        """A flow-control callback raised: reported, as asyncio's transports do."""
        self.loop.call_exception_handler({
            "message": f"protocol.{what}() failed", "exception": exc,
            "transport": self, "protocol": self.protocol})

    def get_write_buffer_size(self):
        return self.out.end - self.out.start

    def get_write_buffer_limits(self):
        return (self.low_water, self.high_water)

    def set_write_buffer_limits(self, high=None, low=None):
        if high is None:
            high = 65536 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self.high_water = high
        self.low_water = low
        if self.state == OPEN:
            self._check_high_water()

    def can_write_eof(self):
        return False

    def write_eof(self):
        raise NotImplementedError("TLS has no half-close")

    # -- closing ----------------------------------------------------------------------------------
    def is_closing(self):
        return self.state >= CLOSING

    def close(self):
        """Send what is buffered and close_notify, then close (see the module docstring)."""
        if self.state >= CLOSING:
            return
        if self.state == HANDSHAKE:
            self._force_close(None)
            return
        self.state = CLOSING
        self.timer = self.loop.call_later(SHUTDOWN_TIMEOUT, self.abort)
        if not self.eof:
            if not self.reader_on:
                self.loop.add_reader(self.fd, self._on_readable_cb)  # for the peer's end
                self.reader_on = True
            if api.SSL_has_pending(self.ssl):
                self.loop.call_soon(self._on_readable_cb)  # it may be there already
        api.ERR_clear_error()
        api.SSL_shutdown(self.ssl)   # queues close_notify
        api.ERR_clear_error()
        if not self.writer_on and not self._send():
            return
        if self.out.end == self.out.start:
            self._sent_all()

    cdef _sent_all(self):
        """Closing, and close_notify is out: the socket closes when the peer's end arrives
        (now, if it came already)."""
        if self.eof:
            self._force_close(None)

    def abort(self):
        self._force_close(None)

    cdef _stop_io(self):
        if self.reader_on:
            self.reader_on = False
            self.loop.remove_reader(self.fd)
        if self.writer_on:
            self.writer_on = False
            self.loop.remove_writer(self.fd)

    cdef _force_close(self, exc):
        if self.state == CLOSED:
            return
        if self.state == HANDSHAKE:
            self._fail(exc if exc is not None else ConnectionAbortedError(
                _errno.ECONNABORTED, "closed during the TLS handshake"))
            return
        self.state = CLOSED
        _unstage(&self.out)
        self._stop_io()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.out.start = self.out.end = 0
        self.sock.close()
        self.protocol_paused = False
        # The bound methods kept for the loop refer to this object: dropped, so that a
        # closed transport is freed by its last reference, not by the cycle collector.
        self._on_readable_cb = self._on_writable_cb = self._read_ready_cb = None
        self.loop.call_soon(self._connection_lost, exc)

    def _connection_lost(self, exc):
        protocol, self.protocol = self.protocol, None
        try:
            protocol.connection_lost(exc)
        finally:
            self.loop = None

    # -- the rest of the transport API ------------------------------------------------------------
    def get_extra_info(self, name, default=None):
        return self.extra.get(name, default)

    def set_protocol(self, protocol):
        self.protocol = protocol
        self.buffered = isinstance(protocol, _asyncio.BufferedProtocol)

    def get_protocol(self):
        return self.protocol

    def __repr__(self):
        states = ("handshake", "open", "closing", "closed")
        return f"<TLSTransport fd={self.fd} {states[self.state]}>"


# The layout of ssl.SSLContext, checked once here: a mismatch turns this module off.
if _why_not is None:
    try:
        _probe = _ssl.SSLContext(_ssl.PROTOCOL_TLS_SERVER)
        _probe.verify_mode = _ssl.CERT_REQUIRED  # 3 in OpenSSL: zeroed memory would not pass
        _ssl_ctx(_probe, True)  # the layout, once
        del _probe
    except (RuntimeError, ValueError, TypeError) as _exc:
        _why_not = str(_exc)
