"""Tensor parallelism: one engine over several processes (ranks), each holding a slice of every
layer. Rank 0 is the engine (scheduler, sampler, KV block tables); the other ranks are followers
that receive each step's inputs as plain integers (step_message.py) and run the same forward on
their slice. Every rank builds the model from its own local ModelSpec (partition.py): its share
of the attention heads (split by KV-head groups, as evenly as they go) and of the MLP's
intermediate width, so the model code is the single-device code plus one all-reduce after each
attention and MLP block, a vocab-parallel embedding and a gathered LM head (model/llama.py).

torch.distributed underneath: gloo on CPU, NCCL on CUDA. No pickle crosses a process boundary:
followers start as `python -m pagewire.parallel.follower` with their settings as JSON.
"""
