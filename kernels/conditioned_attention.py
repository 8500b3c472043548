"""Fused conditioned cross-attention (paper Eq. 7 and 9; DESIGN section 3.1): Triton forward and backward.

The condition enters the logits per key, in base 2 (log2(e) folded in, so the kernels use exp2):

    t_ij = (q_i . k_j) * a_j * log2(e) + b_j                                                    (1)
        mode "scale":    a_j = scale * cond_j,  b_j = 0
        mode "reweight": a_j = scale,           b_j = log2(cond_j + 1e-10)
        padded or out-of-range key: b_j = -inf
    P_ij = exp2(t_ij - lse_i),  lse_i = log2 sum_j exp2(t_ij)                                  (2)
    O_i = sum_j P_ij v_j                                                                        (3)

lse is kept in fp32 per query row. A row without a valid key has t_ij = -inf for every j: it gets O_i = 0,
P_ij = 0 in the backward whatever its lse, hence zero gradients.

Backward, with dS_ij = dL/dlogit_ij = P_ij (dO_i . v_j - delta_i), delta_i = dO_i . O_i:

    dq_i = sum_j dS_ij a_j k_j,   dk_j = a_j sum_i dS_ij q_i,   dv_j = sum_i P_ij dO_i           (4)
    dcond_j = sum_h sum_i dS_ij * scale * (q_i . k_j)        (scale)                           (5)
    dcond_j = sum_h sum_i dS_ij / (cond_j + 1e-10)           (reweight)

Short keys (CVR, Nk <= 128 text tokens) keep a head's keys in one tile: the forward is a single pass with no
online rescaling. Long keys (CLR, hundreds of image tokens) run an online softmax over key blocks; no
(B, H, Nq, Nk) tensor is ever stored. Eq. 5 is reduced deterministically: every (b, h, key block) program
writes its own partial sum over queries, and the heads are summed afterwards (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable
from triton.runtime.interpreter import InterpretedFunction

from reclmis.ops.conditioned_attention import REWEIGHT_EPS

_LOG2E = tl.constexpr(1.4426950408889634)
_EPS = tl.constexpr(REWEIGHT_EPS)


@triton.jit
def _key_terms(Cond, Mask, offs_n, Nk, scale, MODE_SCALE: tl.constexpr, HAS_MASK: tl.constexpr):
    """Per-key slope a_j (natural units) and base-2 bias b_j of Eq. 1 for keys ``offs_n`` of one sample."""
    in_range = offs_n < Nk
    c = tl.load(Cond + offs_n, mask=in_range, other=0.0).to(tl.float32)
    valid = in_range
    if HAS_MASK:
        valid = valid & (tl.load(Mask + offs_n, mask=in_range, other=0) != 0)
    if MODE_SCALE:
        slope = c * scale
        bias = tl.where(valid, 0.0, float("-inf"))
    else:
        slope = tl.zeros_like(c) + scale
        bias = tl.where(valid, tl.log2(c + _EPS), float("-inf"))
    return slope, bias


@triton.jit
def _fwd_kernel(
    Q, K, V, Cond, Mask, Out, Lse,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    H, Nq, Nk, scale,
    MODE_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, ONE_TILE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Eq. 1-3 for BLOCK_M queries of one (b, h): grid (cdiv(Nq, BLOCK_M), B * H)."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=offs_m[:, None] < Nq, other=0.0
    )
    K += b * skb + h * skh
    V += b * svb + h * svh
    Cond += b * Nk
    Mask += b * Nk
    if ONE_TILE:  # all keys in one tile: plain softmax, no rescaling
        a, bias = _key_terms(Cond, Mask, offs_n, Nk, scale, MODE_SCALE, HAS_MASK)
        kv_mask = offs_n[:, None] < Nk
        k = tl.load(K + offs_n[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + offs_n[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
        t = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (a * _LOG2E)[None, :] + bias[None, :]
        m = tl.max(t, 1)
        m = tl.where(m == float("-inf"), 0.0, m)
        p = tl.math.exp2(t - m[:, None])
        l = tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    else:  # online softmax over key blocks
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for start_n in range(0, Nk, BLOCK_N):
            offs_kn = start_n + offs_n
            a, bias = _key_terms(Cond, Mask, offs_kn, Nk, scale, MODE_SCALE, HAS_MASK)
            kv_mask = offs_kn[:, None] < Nk
            k = tl.load(K + offs_kn[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + offs_kn[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
            t = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (a * _LOG2E)[None, :] + bias[None, :]
            m_new = tl.maximum(m, tl.max(t, 1))
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: keep p = alpha = 0
            alpha = tl.math.exp2(m - m_new)
            p = tl.math.exp2(t - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
            m = m_new
    l = tl.where(l > 0.0, l, 1.0)  # a row without valid key: zero output (acc = 0) and lse = 0
    tl.store(
        Out + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :],
        acc / l[:, None],
        mask=offs_m[:, None] < Nq,
    )
    lse = m + tl.log2(l)
    tl.store(Lse + bh * Nq + offs_m, lse, mask=offs_m < Nq)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, Cond, Mask, Out, dOut, Lse, Delta, dQ,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sdob, sdoh, sdon, sdqb, sdqh, sdqn,
    H, Nq, Nk, scale,
    MODE_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """delta_i = dO_i . O_i and dq (Eq. 4) for BLOCK_M queries of a (b, h); grid (cdiv(Nq, BLOCK_M), B*H)."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_mask = offs_m[:, None] < Nq
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=row_mask, other=0.0)
    do = tl.load(
        dOut + b * sdob + h * sdoh + offs_m[:, None] * sdon + offs_d[None, :], mask=row_mask, other=0.0
    )
    o = tl.load(Out + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], mask=row_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(Delta + bh * Nq + offs_m, delta, mask=offs_m < Nq)
    lse = tl.load(Lse + bh * Nq + offs_m, mask=offs_m < Nq, other=float("inf"))
    K += b * skb + h * skh
    V += b * svb + h * svh
    Cond += b * Nk
    Mask += b * Nk
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        offs_kn = start_n + offs_n
        a, bias = _key_terms(Cond, Mask, offs_kn, Nk, scale, MODE_SCALE, HAS_MASK)
        kv_mask = offs_kn[:, None] < Nk
        k = tl.load(K + offs_kn[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + offs_kn[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
        t = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (a * _LOG2E)[None, :] + bias[None, :]
        p = tl.math.exp2(t - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot((ds * a[None, :]).to(k.dtype), k, dq, input_precision=PRECISION)
    tl.store(dQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqn + offs_d[None, :], dq, mask=row_mask)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, Cond, Mask, dOut, Lse, Delta, dK, dV, dCond,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    H, Nq, Nk, scale,
    MODE_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dk, dv (Eq. 4) and one head's term of dcond (Eq. 5) for BLOCK_N keys; grid (cdiv(Nk, BLOCK_N), B*H)."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    a, bias = _key_terms(Cond + b * Nk, Mask + b * Nk, offs_n, Nk, scale, MODE_SCALE, HAS_MASK)
    kv_mask = offs_n[:, None] < Nk
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
    Q += b * sqb + h * sqh
    dOut += b * sdob + h * sdoh
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    dc = tl.zeros([BLOCK_N], tl.float32)
    for start_m in range(0, Nq, BLOCK_M):
        offs_qm = start_m + offs_m
        row_mask = offs_qm[:, None] < Nq
        q = tl.load(Q + offs_qm[:, None] * sqn + offs_d[None, :], mask=row_mask, other=0.0)
        do = tl.load(dOut + offs_qm[:, None] * sdon + offs_d[None, :], mask=row_mask, other=0.0)
        lse = tl.load(Lse + bh * Nq + offs_qm, mask=offs_qm < Nq, other=float("inf"))
        delta = tl.load(Delta + bh * Nq + offs_qm, mask=offs_qm < Nq, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = tl.math.exp2(qk * (a * _LOG2E)[None, :] + bias[None, :] - lse[:, None])
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=PRECISION)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PRECISION)
        if MODE_SCALE:
            dc += tl.sum(ds * qk, 0)
        else:
            dc += tl.sum(ds, 0)
    if MODE_SCALE:
        dc = dc * scale
    else:
        dc = dc / (tl.load(Cond + b * Nk + offs_n, mask=offs_n < Nk, other=1.0).to(tl.float32) + _EPS)
    dk = dk * a[:, None]
    tl.store(dK + b * sdkb + h * sdkh + offs_n[:, None] * sdkn + offs_d[None, :], dk, mask=kv_mask)
    tl.store(dV + b * sdvb + h * sdvh + offs_n[:, None] * sdvn + offs_d[None, :], dv, mask=kv_mask)
    tl.store(dCond + bh * Nk + offs_n, dc, mask=offs_n < Nk)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, token) strides of a (B, H, N, D) tensor whose last dimension is contiguous."""
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_params(q: torch.Tensor, nk: int, mode: str, has_mask: bool) -> tuple[dict, dict, dict]:
    """Compile-time parameters of the forward, dq and dk/dv kernels.

    Short keys (CVR) fit one key tile of at most 32 KiB (128 keys for fp16 and D=128); longer key sequences
    (CLR) run in blocks of half that, which also caps the key block of the dk/dv kernel (two (BLOCK_N, D)
    fp32 accumulators). Query blocks hold at most 16 KiB of q. Eight warps once the fp32 accumulators of a
    program exceed 8192 elements (64 registers a thread).
    """
    nq, d = q.shape[2], q.shape[3]
    row_bytes = d * q.element_size()
    max_tile = min(128, 32768 // row_bytes)
    one_tile = nk <= max_tile
    block_n = max(16, triton.next_power_of_2(nk)) if one_tile else max_tile // 2
    block_n_kv = min(block_n, max_tile // 2)
    block_m = min(64, max(16, 16384 // row_bytes), max(16, triton.next_power_of_2(nq)))
    # Loads pipelined per loop iteration: two (rows, D) tiles (k and v, or q and dO); keep ~64 KiB in flight.
    stages = max(1, min(3, 65536 // (2 * max(block_m, block_n) * row_bytes)))
    common = {
        "MODE_SCALE": mode == "scale",
        "HAS_MASK": has_mask,
        "D": d,
        "BLOCK_M": block_m,
        "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",  # exact fp32 dots, not TF32
        "num_stages": stages,
    }

    def warps(accumulator_elements: int) -> int:
        return 8 if accumulator_elements > 8192 else 4

    fwd = {**common, "BLOCK_N": block_n, "ONE_TILE": one_tile, "num_warps": warps(block_m * (d + block_n))}
    dq = {**common, "BLOCK_N": block_n, "num_warps": warps(block_m * (d + 2 * block_n))}
    dkdv = {**common, "BLOCK_N": block_n_kv, "num_warps": warps(2 * block_n_kv * (d + block_m))}
    return fwd, dq, dkdv


def interpreted() -> bool:
    """Whether this module's kernels run in the Triton interpreter (TRITON_INTERPRET=1 when first imported)."""
    return isinstance(_fwd_kernel, InterpretedFunction)


def _check_runnable(q: torch.Tensor) -> None:
    if q.device.type != "cuda" and not interpreted():
        raise RuntimeError(
            f"the conditioned_attention Triton kernels were compiled for the GPU but got {q.device} tensors: "
            "on CPU they run only in the interpreter, and TRITON_INTERPRET=1 must be set before "
            "reclmis.kernels.conditioned_attention is first imported"
        )


class ConditionedAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the fused kernels; gradients for q, k, v and cond (Eq. 4, 5)."""

    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cond: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        mode: str,
        scale: float,
    ) -> torch.Tensor:
        q, k, v = (_unit_last_stride(t) for t in (q, k, v))
        cond = cond.contiguous()  # (B, Nk), read with row stride Nk like the mask
        mask = None if key_padding_mask is None else key_padding_mask.contiguous().view(torch.uint8)
        b, h, nq, _ = q.shape
        nk = k.shape[2]
        fwd_params, *bwd_params = _launch_params(q, nk, mode, mask is not None)
        out = torch.empty_like(q)  # (B, H, Nq, D)
        lse = torch.empty(b, h, nq, device=q.device, dtype=torch.float32)  # Eq. 2, base 2
        if out.numel():
            _fwd_kernel[(triton.cdiv(nq, fwd_params["BLOCK_M"]), b * h)](
                q, k, v, cond, cond if mask is None else mask, out, lse,
                *_strides(q), *_strides(k), *_strides(v), *_strides(out), h, nq, nk, scale, **fwd_params,
            )  # fmt: skip
        ctx.save_for_backward(q, k, v, cond, mask, out, lse)
        ctx.scale, ctx.bwd_params = scale, bwd_params
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, cond, mask, out, lse = ctx.saved_tensors
        dout = _unit_last_stride(dout)
        dq_params, dkdv_params = ctx.bwd_params
        b, h, nq, _ = q.shape
        nk = k.shape[2]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        delta = torch.empty_like(lse)  # rowsum(dO * O), (B, H, Nq)
        dcond_per_head = torch.empty(b, h, nk, device=q.device, dtype=torch.float32)  # Eq. 5 before sum_h
        mask = cond if mask is None else mask
        if q.numel():
            _bwd_dq_kernel[(triton.cdiv(nq, dq_params["BLOCK_M"]), b * h)](
                q, k, v, cond, mask, out, dout, lse, delta, dq,
                *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(dout), *_strides(dq),
                h, nq, nk, ctx.scale, **dq_params,
            )  # fmt: skip
            _bwd_dkdv_kernel[(triton.cdiv(nk, dkdv_params["BLOCK_N"]), b * h)](
                q, k, v, cond, mask, dout, lse, delta, dk, dv, dcond_per_head,
                *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk), *_strides(dv),
                h, nq, nk, ctx.scale, **dkdv_params,
            )  # fmt: skip
        dcond = dcond_per_head.sum(1).to(cond.dtype)  # fixed-order reduction over heads: deterministic
        return dq, dk, dv, dcond, None, None, None


def conditioned_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cond: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    *,
    mode: str = "scale",
    scale: float | None = None,
) -> torch.Tensor:
    """Fused conditioned attention; inputs as validated by ``reclmis.ops.conditioned_attention``."""
    _check_runnable(q)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return ConditionedAttentionFunction.apply(q, k, v, cond, key_padding_mask, mode, scale)
