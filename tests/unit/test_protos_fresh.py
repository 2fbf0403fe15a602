"""The committed stubs in shared/v1 are exactly what protos/generate.py makes of the .protos.

The generator runs in a process of its own: grpc_tools' protobuf and the one NIXL bundles
crash a process that loads both (seen: munmap_chunk(): invalid pointer), and the workers that
other tests start in this process load NIXL when it is installed."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STUBS_DIR = ROOT / "shared" / "v1"
GENERATE_INTO = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("protos_generate", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.generate(__import__("pathlib").Path(sys.argv[2]))
"""


def test_generated_stubs_are_fresh(tmp_path):
    subprocess.run([sys.executable, "-P", "-c", GENERATE_INTO, str(ROOT / "protos" /
                    "generate.py"), str(tmp_path)], check=True, timeout=120)
    fresh = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    committed = {p.name: p.read_bytes() for p in STUBS_DIR.iterdir() if p.is_file()}
    stale = sorted(name for name in fresh.keys() | committed.keys()
                   if fresh.get(name) != committed.get(name))
    assert not stale, f"shared/v1 is stale ({', '.join(stale)}): run `python protos/generate.py`"
