"""Checks what kite ships: the sdist and the repaired wheels in a dist folder.

    python wheels/check.py [--plat TAG] [--pythons cp310,cp311,...] [--raw DIR]
                           [--checkout DIR] DIST

Every problem is printed, then the script exits 1 (0 when there is none):

- each wheel: named for its CPython and the manylinux tag, holding the compiled
  ``kite/_fastpath``, ``kite/_tls`` and ``kite/_forwarded`` (``.cpython-3X-*.so``), their
  ``.pyi`` stubs and ``py.typed``, every module of ``src/kite``, and nothing else (no tests,
  bench code, Cython sources, generated C, bytecode, grafted libraries); the metadata
  (version from ``kite.__version__``, license, requires-python, dependencies, project URLs,
  classifiers, the README as markdown long description, the ``kite`` console script);
  ``auditwheel show`` finds it consistent with the tag;
- the sdist: every source file of ``src/kite`` including the ``.pyx``/``.pxd``, the build
  files, README and CHANGELOG, and nothing generated or out of scope;
- ``--raw``/``--checkout``: the wheel built from the sdist has the same files and metadata
  as the wheel built straight from the checkout (same Python).

Standard library only, plus the ``auditwheel`` command (wheels/build.sh puts it on PATH).
"""

from __future__ import annotations

import argparse
import ast
import email.parser
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"

problems: list[str] = []


def problem(where: str, what: str) -> None:
    problems.append(f"{where}: {what}")


def version() -> str:
    tree = ast.parse((SRC / "kite" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "__version__":
            return ast.literal_eval(node.value)
    raise SystemExit("check.py: no __version__ in src/kite/__init__.py")


#: The compiled modules (each from its .pyx, with a .pyi stub).
COMPILED = ("_fastpath", "_tls", "_forwarded")


def package_modules() -> set[str]:
    """The package's modules and data as the wheel must hold them (``kite/...``)."""
    files = {p.relative_to(SRC).as_posix() for p in (SRC / "kite").rglob("*.py")
             if "__pycache__" not in p.parts}
    pages = {p.relative_to(SRC).as_posix() for p in (SRC / "kite").rglob("static/*.html")}
    return files | pages | {f"kite/{m}.pyi" for m in COMPILED} | {"kite/py.typed"}


def source_files() -> set[str]:
    """What the sdist must hold under src/: modules, stub, marker and Cython sources."""
    return ({f"src/{f}" for f in package_modules()} | {f"src/kite/{m}.pyx" for m in COMPILED}
            | {"src/kite/_fastpath.pxd"})


# Never in a wheel or the sdist: build leftovers (Cython's annotation page among them) and
# code that is not kite.  The pages under static/ are package data.
FORBIDDEN = re.compile(r"(\.pyc$|__pycache__/|\.c$|_(fastpath|tls|forwarded)\.html$|\.o$"
                       r"|(^|/)tests?/|(^|/)bench/"
                       r"|(^|/)\.ci/|(^|/)wheels/|(^|/)docs/|\.egg-info/)")


def check_metadata(where: str, text: str, ver: str, pythons: list[str]) -> None:
    msg = email.parser.Parser().parsestr(text)
    expect = {"Name": "kite-relay", "Version": ver, "License-Expression": "MIT",
              "Requires-Python": ">=3.10", "Description-Content-Type": "text/markdown"}
    for key, value in expect.items():
        if msg.get(key) != value:
            problem(where, f"metadata {key} is {msg.get(key)!r}, expected {value!r}")
    requires = " ".join(msg.get_all("Requires-Dist") or [])
    for dep in ("cryptography", "click", "httptools", "uvloop", "tomli", "dnspython"):
        if dep not in requires:
            problem(where, f"metadata Requires-Dist lacks {dep}")
    if not msg.get_all("Project-URL"):
        problem(where, "metadata has no Project-URL")
    classifiers = msg.get_all("Classifier") or []
    for cp in pythons:
        want = f"Programming Language :: Python :: 3.{cp[3:]}"
        if want not in classifiers:
            problem(where, f"metadata lacks classifier {want!r}")
    body = msg.get_payload()
    readme = (REPO / "README.md").read_text()
    if not body or body.strip() != readme.strip():
        problem(where, "long description is not README.md")


def check_wheel(path: Path, plat: str, ver: str, pythons: list[str]) -> str | None:
    """Checks one repaired wheel; returns its cpXY tag."""
    where = path.name
    m = re.fullmatch(rf"kite_relay-{re.escape(ver)}-(cp3\d+)-(cp3\d+)-(.+)\.whl", path.name)
    if not m or m[1] != m[2]:
        problem(where, f"not a CPython wheel of kite_relay {ver}")
        return None
    cp, plats = m[1], m[3].split(".")
    if plat not in plats:
        problem(where, f"platform tags {plats} lack {plat}")
    with zipfile.ZipFile(path) as zf:
        names = {n for n in zf.namelist() if not n.endswith("/")}  # auditwheel adds dirs
        distinfo = f"kite_relay-{ver}.dist-info"
        so: set[str] = set()
        for module in COMPILED:
            so_name = rf"kite/{module}\.cpython-{cp[2:]}-x86_64-linux-gnu\.so"
            found = {n for n in names if re.fullmatch(so_name, n)}
            if len(found) != 1:
                problem(where, f"no compiled kite/{module}.cpython-{cp[2:]}-*.so")
            so |= found
        package = {n for n in names if n.startswith("kite/")}
        missing = package_modules() - package
        extra = package - package_modules() - so
        if missing:
            problem(where, f"missing {sorted(missing)}")
        if extra:
            problem(where, f"unexpected files {sorted(extra)}")
        others = {n for n in names if not n.startswith(("kite/", distinfo + "/"))}
        if others:
            problem(where, f"files outside kite/ and {distinfo}/: {sorted(others)}")
        bad = sorted(n for n in names if FORBIDDEN.search(n))
        if bad:
            problem(where, f"build leftovers or non-package code: {bad}")
        check_metadata(where, zf.read(f"{distinfo}/METADATA").decode(), ver, pythons)
        wheel_meta = zf.read(f"{distinfo}/WHEEL").decode()
        if "Root-Is-Purelib: false" not in wheel_meta:
            problem(where, "WHEEL says Root-Is-Purelib: true for a compiled wheel")
        entry_points = zf.read(f"{distinfo}/entry_points.txt").decode()
        if not re.search(r"^kite = kite\.cli:main$", entry_points, re.M):
            problem(where, "no console script kite = kite.cli:main")
    shown = subprocess.run(["auditwheel", "show", str(path)], capture_output=True, text=True)
    out = " ".join(shown.stdout.split())
    found = re.search(r'consistent with the following platform tag: '
                      r'"manylinux_(\d+)_(\d+)_x86_64"', out)
    want = re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64", plat)
    if shown.returncode or not found or not want:
        problem(where, "auditwheel show failed or named no manylinux tag: "
                       f"{shown.stdout}{shown.stderr}")
    elif (int(found[1]), int(found[2])) > (int(want[1]), int(want[2])):
        problem(where, f"auditwheel show: only manylinux_{found[1]}_{found[2]}, not {plat}")
    else:
        print(f"ok  {where}: auditwheel show -> manylinux_{found[1]}_{found[2]}_x86_64"
              f" ({len(names)} files)")
    return cp


def check_sdist(path: Path, ver: str) -> None:
    where = path.name
    top = f"kite_relay-{ver}/"
    with tarfile.open(path) as tf:
        names = {m.name for m in tf.getmembers() if m.isfile()}
        pkg_info = tf.extractfile(top + "PKG-INFO")
        meta = pkg_info.read().decode() if pkg_info else ""
    outside = sorted(n for n in names if not n.startswith(top))
    if outside:
        problem(where, f"files outside {top}: {outside}")
    rel = {n[len(top):] for n in names if n.startswith(top)}
    required = source_files() | {"PKG-INFO", "pyproject.toml", "setup.py", "MANIFEST.in",
                                 "README.md", "CHANGELOG.md"}
    if required - rel:
        problem(where, f"missing {sorted(required - rel)}")
    expected_src = {f for f in rel if f.startswith("src/kite/")}
    if expected_src - source_files():
        problem(where, f"unexpected files {sorted(expected_src - source_files())}")
    bad = sorted(n for n in rel if n.endswith(".so") or (
        FORBIDDEN.search(n) and not n.startswith("src/kite_relay.egg-info/")))
    if bad:
        problem(where, f"build leftovers or non-package code: {bad}")
    check_metadata(where, meta, ver, [])
    if not problems:
        print(f"ok  {where} ({len(rel)} files)")


def compare_builds(raw: Path, checkout: Path) -> None:
    """The wheel built from the sdist must equal the one built from the checkout."""
    for ours in sorted(checkout.glob("*.whl")):
        twin = raw / ours.name
        if not twin.exists():
            print(f"note: no wheel from the sdist named {ours.name}; comparison skipped")
            continue
        with zipfile.ZipFile(ours) as a, zipfile.ZipFile(twin) as b:
            na, nb = set(a.namelist()), set(b.namelist())
            if na != nb:
                problem(ours.name, f"the sdist builds a different wheel: only from the checkout "
                                   f"{sorted(na - nb)}, only from the sdist {sorted(nb - na)}")
                continue
            differ = [n for n in sorted(na) if not n.endswith((".so", "/RECORD"))
                      and a.read(n) != b.read(n)]
            if differ:
                problem(ours.name, f"the sdist builds different contents: {differ}")
            else:
                print(f"ok  {ours.name}: the sdist builds the same wheel ({len(na)} files)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dist", type=Path)
    ap.add_argument("--plat", default="manylinux_2_17_x86_64")
    ap.add_argument("--pythons", default="cp310,cp311,cp312,cp313",
                    help="the CPython tags that must each have a wheel")
    ap.add_argument("--raw", type=Path, help="wheels built from the sdist, before auditwheel")
    ap.add_argument("--checkout", type=Path, help="a wheel built straight from the checkout")
    args = ap.parse_args()
    ver = version()
    pythons = [p for p in args.pythons.split(",") if p]

    sdists = sorted(args.dist.glob("*.tar.gz"))
    if [s.name for s in sdists] != [f"kite_relay-{ver}.tar.gz"]:
        problem(str(args.dist), f"expected one sdist kite_relay-{ver}.tar.gz, found "
                                f"{[s.name for s in sdists]}")
    for sdist in sdists:
        check_sdist(sdist, ver)
    found = [check_wheel(w, args.plat, ver, pythons) for w in sorted(args.dist.glob("*.whl"))]
    if sorted(p for p in found if p) != sorted(pythons):
        problem(str(args.dist), f"wheels for {sorted(p for p in found if p)}, expected "
                                f"{sorted(pythons)}")
    if args.raw and args.checkout:
        compare_builds(args.raw, args.checkout)

    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    if problems:
        print(f"check.py: {len(problems)} problem(s) in {args.dist}", file=sys.stderr)
        return 1
    print(f"check.py: {args.dist} is fine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
