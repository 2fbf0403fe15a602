"""Kernel tests run every Triton kernel on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before any kernel module is imported (triton.jit reads it when
it decorates), so it is set here, at collection, whenever no CUDA device is present.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
