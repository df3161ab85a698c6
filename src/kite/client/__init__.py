"""Client helpers: ``kite connect`` and ``kite forward``."""
