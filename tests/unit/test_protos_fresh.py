"""The committed stubs in shared/v1 are exactly what protos/generate.py makes of the .protos."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_generator():
    path = ROOT / "protos" / "generate.py"
    spec = importlib.util.spec_from_file_location("protos_generate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_stubs_are_fresh(tmp_path):
    generator = _load_generator()
    generator.generate(tmp_path)
    fresh = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    committed = {p.name: p.read_bytes() for p in generator.STUBS_DIR.iterdir() if p.is_file()}
    stale = sorted(name for name in fresh.keys() | committed.keys()
                   if fresh.get(name) != committed.get(name))
    assert not stale, f"shared/v1 is stale ({', '.join(stale)}): run `python protos/generate.py`"
