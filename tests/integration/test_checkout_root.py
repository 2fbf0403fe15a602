"""Nothing depends on the current directory: from the repository root, our top-level folders
(`kernels/`, `shared/`, `services/`, `protos/`, `tests/`, `loadtests/`) never stand in for
installed packages of the same names. transformers imports Hugging Face's `kernels` when it loads
a tokenizer; before issue 13 every worker started in the root died importing our folder instead.
(`pagewire up` itself, from the root, is tests/integration/test_up.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pagewire.import_roots import pagewire_argv

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and p.name.isidentifier())

# Where each folder's name resolves, printed as JSON; run after `import pagewire`.
WHERE_NAMES_RESOLVE = f"""
import importlib.util, json, sys
found = {{n: importlib.util.find_spec(n) for n in {FOLDERS!r}}}
print(json.dumps({{n: s and (s.origin or list(s.submodule_search_locations))
                  for n, s in found.items()}}))
"""


def _python(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _under_root(where) -> bool:
    """Whether a module was found in the checkout's own folders. A virtual environment made in
    the root (the README's `python3 -m venv .venv`) is not the checkout: its site-packages is
    where installed packages belong."""
    paths = where if isinstance(where, list) else [where] if where else []
    return any(Path(p).resolve().is_relative_to(ROOT) and "site-packages" not in Path(p).parts
               for p in paths)


def test_hugging_faces_kernels_is_installed_and_this_test_process_imports_it():
    import kernels

    assert FOLDERS and "kernels" in FOLDERS
    assert not _under_root(kernels.__file__), kernels.__file__
    assert hasattr(kernels, "get_kernel")  # the hub's API, which our folder does not have


@pytest.mark.parametrize("start", ["-c", "-m"])
def test_no_folder_of_the_root_shadows_a_name_once_pagewire_is_imported(tmp_path, start):
    """`python -c` in the root puts '' on sys.path, `python -m` the root itself."""
    script = "import pagewire\n" + WHERE_NAMES_RESOLVE
    if start == "-m":
        (tmp_path / "where_names_resolve.py").write_text(script)
        argv = ["-m", "where_names_resolve"]
        env = {"PYTHONPATH": str(tmp_path)}
    else:
        argv, env = ["-c", script], None
    from_root = json.loads(_python(argv, ROOT, env))
    elsewhere = json.loads(_python(argv, tmp_path, env))
    assert from_root == elsewhere
    assert not [name for name, where in from_root.items() if _under_root(where)]


def test_processes_pagewire_starts_have_no_current_folder_on_sys_path():
    argv = pagewire_argv()[1:-2] + ["-c", "import sys, json; print(json.dumps(sys.path))"]
    assert argv[0] == "-P"
    sys_path = json.loads(_python(argv, ROOT))
    assert "" not in sys_path and str(ROOT) not in sys_path


@pytest.mark.slow
def test_an_installed_copy_runs_the_offline_api_from_the_root(tmp_path):
    """A non-editable install (a wheel in a folder of its own) used from the repository root."""
    target = tmp_path / "site"
    built = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet",
                            "--target", str(target), str(ROOT)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    code = ("from pagewire import LLM, SamplingParams; import pagewire, kernels, json\n"
            "llm = LLM(kv_cache_memory_bytes=64 << 20, max_model_len=256, show_progress=False)\n"
            "out = llm.generate(['The capital of France is'],\n"
            "                   SamplingParams(temperature=0, max_tokens=4))[0].outputs[0]\n"
            "print(json.dumps([pagewire.__file__, kernels.__file__, out.token_ids]))")
    pagewire_file, kernels_file, token_ids = json.loads(
        _python(["-c", code], ROOT, {"PYTHONPATH": str(target)}).splitlines()[-1])
    assert Path(pagewire_file).is_relative_to(target)  # the installed copy, not the checkout
    assert not _under_root(kernels_file)
    assert len(token_ids) == 4
