"""Weight-only quantized GEMM (W4A16, W8A16) for small batches: out [M, N] = x [M, K] @ W, with
W held as 4- or 8-bit integers packed into int32 along K (pagewire.model.quantization.
weight_only's layout, which GPTQ, AWQ, compressed-tensors and GGUF all load into) and dequantized
inside the GEMM: w[k, n] = q[k, n] * scales[k // group, n] + offsets[k // group, n].

At decode batch sizes the GEMM is bound by reading the weight, so reading 4 bits a weight
instead of 16 is the whole gain. Each program owns BLOCK_N output columns and one slice of K
(split-K: the few column blocks of a 4096-wide layer would leave most of an H100's 132 SMs
idle); it loads BLOCK_K/8 rows of packed words once, unpacks them with shifts in registers,
scales them by the group's row of scales and offsets (BLOCK_K divides the group size, so one
row per step), and accumulates tl.dot in float32. Slices meet by atomic adds into a float32
buffer, cast to x's dtype at the end.
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
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    PER_WORD: tl.constexpr = 32 // BITS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    words = tl.arange(0, BLOCK_K // PER_WORD)
    shifts = (tl.arange(0, PER_WORD) * BITS).to(tl.int32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None], other=0.0)
        packed = tl.load(qweight_ptr + (k0 // PER_WORD + words)[:, None] * stride_qk +
                         offs_n[None, :], mask=mask_n[None, :], other=0)
        q = (packed[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
        q = tl.reshape(q, (BLOCK_K, BLOCK_N))  # row 8i + j is word i's value j
        group = k0 // GROUP
        scale = tl.load(scales_ptr + group * stride_sg + offs_n, mask=mask_n, other=0.0)
        offset = tl.load(offsets_ptr + group * stride_sg + offs_n, mask=mask_n, other=0.0)
        w = q.to(tl.float32) * scale.to(tl.float32)[None, :] + offset.to(tl.float32)[None, :]
        acc += tl.dot(x, w.to(x.dtype))
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.atomic_add(out_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


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
    """x [M, K] (M <= 64, unit stride along K) -> [M, N] in x's dtype."""
    assert x.dim() == 2 and x.stride(-1) == 1 and qweight.stride(-1) == 1
    m, k = x.shape
    n = qweight.shape[1]
    assert m <= 64 and qweight.shape[0] * 32 // bits == k
    block_k = min(block_k, group_size)
    assert group_size % block_k == 0 and block_k % (32 // bits) == 0 and block_k >= 16
    out = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    n_blocks, k_steps = triton.cdiv(n, block_n), k // block_k
    if split_k is None:
        split_k = choose_split_k(n_blocks, k_steps, _num_sms(x.device))
    k_per_split = triton.cdiv(k_steps, split_k) * block_k
    grid = (n_blocks, triton.cdiv(k, k_per_split))
    _weight_only_gemm_kernel[grid](
        x, qweight, scales, offsets, out, m, n, k, x.stride(0), qweight.stride(0),
        scales.stride(0), out.stride(0), k_per_split, BITS=bits, GROUP=group_size,
        BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages)
    return out.to(x.dtype)


def weight_only_gemm_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                               offsets: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Dequantize to float32, then multiply (WeightOnlyLinear's own CPU path)."""
    from pagewire.model.quantization.weight_only import unpack_rows

    q = unpack_rows(qweight, bits).float().view(-1, group_size, qweight.shape[1])
    w = (q * scales.float().unsqueeze(1) + offsets.float().unsqueeze(1)).flatten(0, 1)
    return (x.float() @ w).to(x.dtype)
