"""The fused Triton kernels over rows of logits (METHOD.md §5); their semantics are ``reference.py``'s.

Forward: one pass over each row with one running max m per row (updated once per block) and per-lane
accumulators s = Σ e^{x−m} and t = Σ (x − m) e^{x−m}, rescaled by one scalar e^{m_old − m} when m grows: one
``exp`` per element (and one per block), summed across lanes at the end:
lse = m + log s, H = log s − t/s, logp = x_y − lse. Accumulating (x − m) rather than x keeps H accurate for
peaked rows (no cancellation of two numbers near max x). Backward: one more pass that writes
dz_j = [g_logp (δ_jy − p_j) − g_H p_j (log p_j + H) + g_lse p_j] / T.

Pitfalls handled: the vocabulary tail is masked (V is rarely a multiple of BLOCK: 151936 mod 1024 = 384),
row offsets are int64 (N·V > 2^31 for long rollouts), the grid is 1-D over rows (grid-y is capped at
65535), and −inf logits never produce 0·(−inf) = NaN. Accumulation is fp32 whatever the input dtype.

``triton.jit`` reads ``TRITON_INTERPRET`` when this module is imported: ``ops.py`` imports it on first
use, so setting ``TRITON_INTERPRET=1`` before the first call runs the kernels on a CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _logp_entropy_forward(
    logits_ptr, ids_ptr, logp_ptr, entropy_ptr, lse_ptr, row_stride, n_vocab, inv_temperature, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride  # int64 offsets
    lanes = tl.arange(0, BLOCK)
    m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)  # the row's running max of x = z / T: one fp32 scalar
    s = tl.zeros([BLOCK], tl.float32)  # per-lane Σ e^{x − m}
    t = tl.zeros([BLOCK], tl.float32)  # per-lane Σ (x − m) e^{x − m}
    for start in range(0, n_vocab, BLOCK):
        cols = start + lanes
        x = tl.load(base + cols, mask=cols < n_vocab, other=float("-inf")).to(tl.float32) * inv_temperature
        m_new = tl.maximum(m, tl.max(x, axis=0))
        anchor = tl.where(m_new == float("-inf"), 0.0, m_new)  # only −inf so far: s = t = 0 stay 0
        shift = tl.where(m == float("-inf"), 0.0, m - anchor)
        alpha = tl.exp(m - anchor)  # one exp per block
        e = tl.exp(x - anchor)  # one exp per element
        t = alpha * (t + shift * s) + tl.where(e > 0, (x - anchor) * e, 0.0)
        s = alpha * s + e
        m = m_new
    dead = m == float("-inf")  # no finite logit in the row
    anchor_row = tl.where(dead, 0.0, m)
    s_row = tl.sum(s, axis=0)
    t_row = tl.sum(t, axis=0)
    log_s = tl.log(tl.where(dead, 1.0, s_row))
    target = tl.load(ids_ptr + row).to(tl.int64)
    x_target = tl.load(base + target).to(tl.float32) * inv_temperature
    lse = tl.where(dead, float("-inf"), anchor_row + log_s)
    tl.store(lse_ptr + row, lse)
    tl.store(entropy_ptr + row, tl.where(dead, 0.0, log_s - t_row / tl.where(dead, 1.0, s_row)))
    tl.store(logp_ptr + row, tl.where(dead, 0.0, x_target - anchor_row - log_s))


@triton.jit
def _logp_entropy_backward(
    logits_ptr,
    ids_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    grad_lse_ptr,
    grad_logits_ptr,
    row_stride,
    grad_row_stride,
    n_vocab,
    inv_temperature,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    out = grad_logits_ptr + row * grad_row_stride
    lanes = tl.arange(0, BLOCK)
    lse = tl.load(lse_ptr + row)
    dead = lse == float("-inf")
    lse_safe = tl.where(dead, 0.0, lse)
    entropy = tl.load(entropy_ptr + row)
    g_logp = tl.where(dead, 0.0, tl.load(grad_logp_ptr + row).to(tl.float32))
    g_entropy = tl.where(dead, 0.0, tl.load(grad_entropy_ptr + row).to(tl.float32))
    g_lse = tl.where(dead, 0.0, tl.load(grad_lse_ptr + row).to(tl.float32))
    target = tl.load(ids_ptr + row).to(tl.int64)
    for start in range(0, n_vocab, BLOCK):
        cols = start + lanes
        inside = cols < n_vocab
        x = tl.load(base + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_temperature
        log_p = x - lse_safe
        p = tl.where(dead, 0.0, tl.exp(log_p))
        plogp = tl.where(p > 0, p * (log_p + entropy), 0.0)
        hit = tl.where(cols == target, 1.0, 0.0)
        grad = (g_logp * (hit - p) - g_entropy * plogp + g_lse * p) * inv_temperature
        tl.store(out + cols, grad.to(grad_logits_ptr.dtype.element_ty), mask=inside)


def _launch_config(n_vocab: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK, num_warps) of the untuned launch (the CPU interpreter, slow per lane: at most 1024 lanes)."""
    cap = 4096 if device.type == "cuda" else 1024
    block = min(cap, triton.next_power_of_2(n_vocab))
    return block, (8 if block >= 2048 else 4)


# On a GPU, BLOCK and the warp count are autotuned per vocabulary size (and, by Triton's cache key, per dtype).
_CONFIGS = [triton.Config({"BLOCK": block}, num_warps=warps) for block in (1024, 2048, 4096, 8192) for warps in (4, 8, 16)]
_forward_tuned = triton.autotune(configs=_CONFIGS, key=["n_vocab"])(_logp_entropy_forward)
_backward_tuned = triton.autotune(configs=_CONFIGS, key=["n_vocab"])(_logp_entropy_backward)


def _launch(kernel, tuned, n_rows: int, n_vocab: int, device: torch.device, *args) -> None:
    """Launch ``kernel`` over ``n_rows`` rows: autotuned on a GPU, with ``_launch_config`` in the interpreter."""
    if device.type == "cuda":
        tuned[(n_rows,)](*args)
    else:
        block, warps = _launch_config(n_vocab, device)
        kernel[(n_rows,)](*args, BLOCK=block, num_warps=warps)


def forward(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: ``(logp, entropy, lse)`` [N] float32 for logits [N, V] (unit stride in V)."""
    n_rows, n_vocab = logits.shape
    logp = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    entropy = torch.empty_like(logp)
    lse = torch.empty_like(logp)
    if n_rows:
        _launch(_logp_entropy_forward, _forward_tuned, n_rows, n_vocab, logits.device,
                logits, ids, logp, entropy, lse, logits.stride(0), n_vocab, 1.0 / temperature)  # fmt: skip
    return logp, entropy, lse


def backward(
    logits: torch.Tensor,
    ids: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor,
    grad_lse: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Launch the backward kernel: dL/dlogits [N, V] in the dtype of ``logits``."""
    n_rows, n_vocab = logits.shape
    grad = torch.empty((n_rows, n_vocab), dtype=logits.dtype, device=logits.device)
    if n_rows:
        _launch(_logp_entropy_backward, _backward_tuned, n_rows, n_vocab, logits.device,
                logits, ids, lse, entropy, grad_logp, grad_entropy, grad_lse, grad, logits.stride(0), grad.stride(0),
                n_vocab, 1.0 / temperature)  # fmt: skip
    return grad
