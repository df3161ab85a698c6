"""The relay (frontend): ``kite relay``."""
