"""Type stub of the compiled kite._forwarded (see _forwarded.pyx for what it does)."""

from typing import Optional

IDLE_MAX: int
MAX_RENAMES: int

def rewrite_one_head(head: bytes, fixed: bytes, copy_host: bool) -> Optional[tuple[bytes, bool]]: ...
