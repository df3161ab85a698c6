"""kite: a fast, self-hostable relay that makes servers behind NAT reachable by name.

It speaks the PageKite protocol (pagekite.py 1.5.2 frontends and backends interoperate).
"""

__version__ = "0.1.0"
