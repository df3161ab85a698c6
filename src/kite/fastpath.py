"""Selects the fast path: the compiled ``kite._fastpath`` or its pure-Python twin.

The compiled side has a second part, ``kite._forwarded`` (the X-Forwarded rewriter's
common case, :data:`rewrite_one_head`); its twin is the rewriter's own Python path
(``kite.proto.forwarded``), which runs where :data:`rewrite_one_head` is ``None``.  The two
are built together; each is loaded on its own (a checkout built before one of them
existed keeps the other), with the same rules and a warning that names the one missing.

``KITE_NO_EXTENSIONS=1`` selects the twin (``kite._fastpath_py``) quietly;
``KITE_REQUIRE_EXTENSIONS=1`` turns a missing or broken extension into an ImportError (CI and
wheel builds set it).  Otherwise a missing extension (an install from the sdist where no C
compiler worked) means the twin with one :class:`FastPathFallbackWarning` at import.
``IMPLEMENTATION`` says which one is in use: ``"c"`` or ``"py"``.
"""

import os
import warnings
from typing import Callable, Optional

from . import _fastpath_py

_NO_EXT = os.environ.get("KITE_NO_EXTENSIONS", "") not in ("", "0")
_REQUIRE_EXT = os.environ.get("KITE_REQUIRE_EXTENSIONS", "") not in ("", "0")

if _NO_EXT and _REQUIRE_EXT:
    raise ImportError("KITE_NO_EXTENSIONS and KITE_REQUIRE_EXTENSIONS are both set; unset one")


class FastPathFallbackWarning(RuntimeWarning):
    """The compiled fast path is missing and kite runs on the slower pure-Python twin."""


_impl = _fastpath_py
IMPLEMENTATION = "py"
#: ``kite._forwarded.rewrite_one_head``, or None on the twin.
rewrite_one_head: Optional[Callable[[bytes, bytes, bool], Optional[tuple[bytes, bool]]]] = None
if not _NO_EXT:
    try:
        from . import _fastpath as _impl  # type: ignore[no-redef]

        IMPLEMENTATION = "c"
    except ImportError as exc:
        if _REQUIRE_EXT:
            raise ImportError(
                f"KITE_REQUIRE_EXTENSIONS=1 but kite._fastpath did not load ({exc}); "
                "reinstall with `pip install .` so the extension compiles"
            ) from exc
        warnings.warn(
            f"kite: the compiled fast path (kite._fastpath) is not available ({exc}); running "
            "on the pure-Python twin, which is slower. Reinstall kite-relay from a wheel or with "
            "a C compiler present; KITE_NO_EXTENSIONS=1 selects the twin without this warning.",
            FastPathFallbackWarning,
            stacklevel=1,  # points at this module: it is imported once, so warns once
        )
        _impl = _fastpath_py
if IMPLEMENTATION == "c":
    try:
        from ._forwarded import rewrite_one_head
    except ImportError as exc:
        if _REQUIRE_EXT:
            raise ImportError(
                f"KITE_REQUIRE_EXTENSIONS=1 but kite._forwarded did not load ({exc}); "
                "reinstall with `pip install .` so the extension compiles"
            ) from exc
        warnings.warn(
            f"kite: the compiled X-Forwarded rewrite (kite._forwarded) is not available "
            f"({exc}); request heads take the rewriter's Python path, which is slower. "
            "Reinstall kite-relay, or rebuild a checkout (python setup.py build_ext --inplace).",
            FastPathFallbackWarning,
            stacklevel=1,
        )

Demux = _impl.Demux
ChunkWriter = _impl.ChunkWriter
StreamSlot = _impl.StreamSlot
MAX_CHUNK_SIZE = _impl.MAX_CHUNK_SIZE
MAX_DATA_PAYLOAD = _impl.MAX_DATA_PAYLOAD
MAX_SIZE_DIGITS = _impl.MAX_SIZE_DIGITS

__all__ = [
    "IMPLEMENTATION",
    "Demux",
    "ChunkWriter",
    "StreamSlot",
    "MAX_CHUNK_SIZE",
    "MAX_DATA_PAYLOAD",
    "MAX_SIZE_DIGITS",
    "rewrite_one_head",
]
