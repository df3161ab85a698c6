"""``python -m relaybench`` (with bench/ on sys.path): the same as ``python bench/relay_bench.py``."""

import sys

from .cli import main

sys.exit(main())
