"""Kernel tests run every Triton kernel on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported (its own library functions are
jitted then): tests/conftest.py sets it for the whole session; this repeats it for a run that
starts here.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
