"""Weight-only quantized GEMM (W4A16, W8A16) for small batches: out [M, N] = x [M, K] @ W, with
W held as 4- or 8-bit integers packed into int32 along K (pagewire.model.quantization.
weight_only's layout, which GPTQ, AWQ, compressed-tensors and GGUF all load into) and dequantized
inside the GEMM: w[k, n] = q[k, n] * scales[k // group, n] + offsets[k // group, n].

At decode batch sizes the GEMM is bound by reading the weight, so reading 4 bits a weight
instead of 16 is the whole gain, if the unpacking keeps up. Each program owns BLOCK_N output
columns and one slice of K (split-K: the few column blocks of a 4096-wide layer would leave most
of an H100's 132 SMs idle). Per step it loads BLOCK_K / PER_WORD rows of packed words once;
value j of every word (`>> j * BITS`) is the row block k = PER_WORD * i + j, so it multiplies
with x's columns j, j + PER_WORD, ... (a strided load of x, which is tiny) in one tl.dot per j:
no reshuffle of the unpacked values through shared memory (the first version's tl.reshape of
[words, PER_WORD, N] to [K, N] measured 23-34% of copy bandwidth on an H100).

When the group spans whole steps (GPTQ/AWQ's 128), the scale and offset leave the inner
product: the integers (exact in bf16) are summed against x, then scaled once per column,
acc += (x . q) * s + (sum x) * o, as the CPU kernel does. Smaller groups (GGUF's 16 and 32)
dequantize each word row with its own group's scale and offset before the dot. Slices meet by
atomic adds into a float32 buffer (cast to x's dtype after); one slice stores directly.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _weight_only_gemm_kernel(x_ptr, qweight_ptr, scales_ptr, offsets_ptr, out_ptr,
                             M, N, K, stride_xm, stride_qk, stride_sg, stride_om,
                             k_per_split,
                             BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             FOLD: tl.constexpr, ATOMIC: tl.constexpr):
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    words = tl.arange(0, WORDS)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        rows = k0 + words * PER_WORD  # the first input column of each word row
        mask_w = rows < K
        packed = tl.load(qweight_ptr + (k0 // PER_WORD + words)[:, None] * stride_qk +
                         offs_n[None, :], mask=mask_w[:, None] & mask_n[None, :], other=0)
        if FOLD:  # one group for the whole step
            part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            x_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
            for j in tl.static_range(PER_WORD):
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (rows + j)[None, :],
                            mask=mask_m[:, None] & mask_w[None, :], other=0.0)
                q = ((packed >> (j * BITS)) & ((1 << BITS) - 1)).to(x.dtype)
                part += tl.dot(x, q)
                x_sum += tl.sum(x.to(tl.float32), axis=1)
            group = k0 // GROUP
            scale = tl.load(scales_ptr + group * stride_sg + offs_n, mask=mask_n, other=0.0)
            offset = tl.load(offsets_ptr + group * stride_sg + offs_n, mask=mask_n, other=0.0)
            acc += part * scale.to(tl.float32)[None, :] + \
                x_sum[:, None] * offset.to(tl.float32)[None, :]
        else:  # each word row in its own group (a word never straddles two)
            group_ptrs = (rows // GROUP)[:, None] * stride_sg + offs_n[None, :]
            mask_g = mask_w[:, None] & mask_n[None, :]
            scale = tl.load(scales_ptr + group_ptrs, mask=mask_g, other=0.0).to(tl.float32)
            offset = tl.load(offsets_ptr + group_ptrs, mask=mask_g, other=0.0).to(tl.float32)
            for j in tl.static_range(PER_WORD):
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (rows + j)[None, :],
                            mask=mask_m[:, None] & mask_w[None, :], other=0.0)
                q = ((packed >> (j * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
                acc += tl.dot(x, (q * scale + offset).to(x.dtype))
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask_out = mask_m[:, None] & mask_n[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=mask_out)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_out)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_split_k(n_blocks: int, k_steps: int, num_sms: int) -> int:
    """Enough K slices that column blocks x slices cover the SMs about twice."""
    return max(1, min(k_steps, -(-2 * num_sms // n_blocks)))


def weight_only_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     offsets: torch.Tensor, bits: int, group_size: int, block_n: int = 64,
                     block_k: int = 128, split_k: int | None = None, num_warps: int = 4,
                     num_stages: int = 3) -> torch.Tensor:
    """x [M, K] (M <= 64, unit stride along K) -> [M, N] in x's dtype. block_k: input columns a
    step (a multiple of 16 packed words, tl.dot's least: 128 at 4 bits, 64 at 8)."""
    assert x.dim() == 2 and x.stride(-1) == 1 and qweight.stride(-1) == 1
    m, k = x.shape
    n = qweight.shape[1]
    per_word = 32 // bits
    assert m <= 64 and qweight.shape[0] * per_word == k and group_size % per_word == 0
    block_k = max(block_k, 16 * per_word)
    assert block_k % (16 * per_word) == 0
    n_blocks, k_steps = triton.cdiv(n, block_n), triton.cdiv(k, block_k)
    if split_k is None:
        split_k = choose_split_k(n_blocks, k_steps, _num_sms(x.device))
    k_per_split = triton.cdiv(k_steps, split_k) * block_k
    grid = (n_blocks, triton.cdiv(k, k_per_split))
    atomic = grid[1] > 1
    out = torch.zeros((m, n), dtype=torch.float32, device=x.device) if atomic else \
        torch.empty((m, n), dtype=x.dtype, device=x.device)
    _weight_only_gemm_kernel[grid](
        x, qweight, scales, offsets, out, m, n, k, x.stride(0), qweight.stride(0),
        scales.stride(0), out.stride(0), k_per_split, BITS=bits, GROUP=group_size,
        BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n, BLOCK_K=block_k,
        FOLD=group_size % block_k == 0, ATOMIC=atomic, num_warps=num_warps,
        num_stages=num_stages)
    return out.to(x.dtype) if atomic else out


def weight_only_gemm_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                               offsets: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Dequantize to float32, then multiply (WeightOnlyLinear's own CPU path)."""
    from pagewire.model.quantization.weight_only import unpack_rows

    q = unpack_rows(qweight, bits).float().view(-1, group_size, qweight.shape[1])
    w = (q * scales.float().unsqueeze(1) + offsets.float().unsqueeze(1)).flatten(0, 1)
    return (x.float() @ w).to(x.dtype)
