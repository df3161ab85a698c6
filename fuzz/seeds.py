"""Write each target's seed inputs (targets.SEEDS) into CORPUS/<name>/ (default fuzz/corpus)."""

import hashlib
import os
import sys

from targets import SEEDS


def main(root: str) -> None:
    for name, seeds in SEEDS.items():
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        for seed in seeds:
            path = os.path.join(folder, "seed-" + hashlib.sha1(seed).hexdigest()[:16])
            with open(path, "wb") as f:
                f.write(seed)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "corpus"))
