"""A trimmed copy of the NIXL wheels, small enough to carry to a GPU machine without an index.

The nixl-cu12/cu13 wheels are ~60-70 MB (230 MB unpacked): most of it is an expert-parallel
module built for three torch versions and plugins for object stores that the KV transport never
loads. This keeps the Python API, the UCX plugin and UCX's transports, and every library they
need (the closure of their ELF NEEDED entries, read with readelf), and packs it as a .tar.gz
(~13 MB for nixl-cu13 1.5.1) to unpack on the device and put on PYTHONPATH.

    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 nixl-cu13==1.5.1 nixl==1.5.1 -d /tmp/nixl-wheels
    python loadtests/trim_nixl.py /tmp/nixl-wheels/*.whl --out .nixl/nixl-trimmed.tar.gz
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path


def needed(library: Path) -> list[str]:
    dynamic = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True)
    return re.findall(r"\(NEEDED\).*\[(.*)\]", dynamic.stdout)


def keep_set(site: Path) -> set[Path]:
    backend = next(p for p in site.iterdir() if re.fullmatch(r"nixl_cu\d+", p.name))
    libs = {p.name: p for p in site.rglob("*.so*") if p.is_file()}
    roots = [*backend.glob("*.so"), *site.glob(f"{backend.name}.libs/ucx/libuct*.so*"),
             *site.glob(f"{backend.name}.libs/ucx/libucm*.so*"),
             *site.glob(f"{backend.name}.libs/nixl/libplugin_UCX.so"),
             *site.glob(f".{backend.name}.mesonpy.libs/plugins/libplugin_UCX.so")]
    keep, todo = set(roots), list(roots)
    while todo:
        for name in needed(todo.pop()):
            if name in libs and libs[name] not in keep:
                keep.add(libs[name])
                todo.append(libs[name])
    python = [*backend.glob("*.py"), *site.glob("nixl/*.py"), *site.glob("nixl_meta_utils.py")]
    return keep | set(python)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheels", nargs="+", type=Path, help="nixl and one nixl-cuNN wheel")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp)
        for wheel in args.wheels:
            zipfile.ZipFile(wheel).extractall(site)
        keep = keep_set(site)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.out, "w:gz") as archive:
            for path in sorted(keep):
                archive.add(path, arcname=str(path.relative_to(site)))
        size = sum(p.stat().st_size for p in keep)
    print(f"{len(keep)} files, {size / 1e6:.0f} MB unpacked -> {args.out} "
          f"({args.out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
