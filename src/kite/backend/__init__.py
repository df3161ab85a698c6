"""The backend: ``kite expose``."""
