"""A parallel rank other than 0 (tensor, pipeline or both): loads its slice of the model, then
runs every forward rank 0 announces (step_message.py) until told to stop or rank 0 goes away (a
collective then fails and this process exits).

    python -m pagewire.parallel.follower --rank 1 --size 2 --init-method tcp://127.0.0.1:PORT \
        --config '{"model": null, "device": "cpu", ...}'
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def start(config, rank: int, size: int, init_method: str):
    """Rank 0's side: launches this module for `rank` (JSON settings, no pickle)."""
    import dataclasses
    import subprocess

    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                if f.name != "speculative_config"}
    return subprocess.Popen([sys.executable, "-P", "-m", "pagewire.parallel.follower",
                             "--rank", str(rank), "--size", str(size),
                             "--init-method", init_method, "--config", json.dumps(settings)])


def rank_device(config, rank: int) -> torch.device:
    """One GPU per rank (cuda:rank); CPU ranks share the host."""
    return torch.device(f"cuda:{rank}" if config.device.startswith("cuda") else "cpu")


@torch.inference_mode()
def serve(config, rank: int, size: int, init_method: str) -> int:
    from transformers import AutoConfig

    from pagewire.device_copies import to_device
    from pagewire.engine.model_runner import (
        gather_rank_blocks,
        load_model,
        profile_kv_budget,
        rank_place,
        run_step,
        write_rank_blocks,
    )
    from pagewire.model.llama import ModelSpec
    from pagewire.model.model_source import resolve_model
    from pagewire.parallel import kv_blocks, step_message
    from pagewire.parallel.group import TPGroup

    device = rank_device(config, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    config = config.replace(device=str(device))
    group = TPGroup(rank, size, init_method, device)
    source = resolve_model(config.model, config.tokenizer)
    spec = ModelSpec.from_hf_config(AutoConfig.from_pretrained(source.model_dir))
    place = rank_place(spec, config, rank)
    local = place.local_spec(spec)
    model = load_model(spec, source, config, place, group)
    caches: list[torch.Tensor] = []
    kv_cache = None
    try:
        while True:
            kind, value, step = step_message.receive(group)
            if kind == step_message.STOP:
                return 0
            if kind == step_message.PROFILE:
                group.min(profile_kv_budget(model, local, config, device))
            elif kind == step_message.ALLOCATE:
                kv_cache = torch.zeros(
                    (local.num_layers, 2, value, config.block_size, local.num_kv_heads,
                     local.head_dim), dtype=config.kv_torch_dtype, device=device)
                caches = list(kv_cache.unbind(0))
            elif kind == step_message.READ_BLOCKS:
                gather_rank_blocks(group, spec, config, kv_cache, step)
            elif kind == step_message.WRITE_BLOCKS:  # whole blocks: this rank keeps its part
                shape = (len(step), spec.num_layers, 2, config.block_size, spec.num_kv_heads,
                         spec.head_dim)
                blocks = kv_blocks.broadcast_blocks(group, None, shape, config.kv_torch_dtype)
                index = torch.tensor(step, dtype=torch.long, device=device)
                write_rank_blocks(kv_cache, index,
                                  kv_blocks.own_part(blocks, *place.kv_slices(spec)))
            else:
                ids = None
                if value == step_message.IDS_ON_DEVICE:  # sampled by rank 0, not read back
                    ids = group.broadcast(torch.empty(len(step.input_ids), dtype=torch.long,
                                                      device=device))
                hidden = run_step(model, caches, step, config.block_size, device, ids)
                if step.logit_rows:  # the vocabulary-parallel LM head gathers
                    model.compute_logits(hidden[to_device(step.logit_rows, torch.long, device)])
    except RuntimeError as exc:  # a collective failed: rank 0 (or another rank) is gone
        print(f"pagewire: parallel rank {rank} stops: {str(exc).splitlines()[0][:200]}",
              file=sys.stderr, flush=True)
        return 1
    finally:
        group.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--init-method", required=True)
    parser.add_argument("--config", required=True, help="EngineConfig's fields as JSON")
    args = parser.parse_args(argv)
    from pagewire.config import EngineConfig

    config = EngineConfig(**json.loads(args.config))
    return serve(config, args.rank, args.size, args.init_method)


if __name__ == "__main__":
    sys.exit(main())
