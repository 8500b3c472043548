"""Fused conditioned cross-attention (paper Eq. 7 and 9; DESIGN section 3.1): Triton forward and backward.

The condition enters the logits per key, in base 2 (log2(e) folded in, so the kernels use exp2):

    t_ij = (q_i . k_j) * a_j * log2(e) + b_j                                                    (1)
        mode "scale":    a_j = scale * cond_j,  b_j = 0
        mode "reweight": a_j = scale,           b_j = log2(cond_j + 1e-10)
        padded or out-of-range key: b_j = -inf
    P_ij = exp2(t_ij - lse_i),  lse_i = log2 sum_j exp2(t_ij)                                  (2)
    O_i = sum_j P_ij v_j                                                                        (3)

lse is kept in fp32 per query row; a row without a valid key has t_ij = -inf for every j, gets O_i = 0 and
lse_i = +inf, so that P_ij = exp2(-inf) = 0 in the backward and its gradients are zero.

Backward, with dS_ij = dL/dlogit_ij = P_ij (dO_i . v_j - delta_i), delta_i = dO_i . O_i:

    dq_i = sum_j dS_ij a_j k_j,   dk_j = a_j sum_i dS_ij q_i,   dv_j = sum_i P_ij dO_i           (4)
    dcond_j = sum_h sum_i dS_ij * scale * (q_i . k_j)        (scale)                           (5)
    dcond_j = sum_h sum_i dS_ij / (cond_j + 1e-10)           (reweight)

Forward: BLOCK_M queries of a (b, h) per program, keys in blocks with an online softmax (one block when the
keys fit a tile, as the text does in the CVR). The running maximum stays -inf until a valid key is seen; a
finite stand-in enters only the exponentials, so any amount of leading padding leaves P exact.

Backward: a (query block, key block) tile recomputes S and P, computes dP and dS once and feeds dq, dk and
dv from them: five dots per tile. When one side fits a tile (the keys in the CVR, the queries in the CLR), a
single launch with one program per (b, h) holds that side and streams the other, reading q, k, v, O, dO and
cond once. The streamed side runs in blocks of BLOCK rows and then TAIL = 16 rows, so at most 15 padded
rows are computed. When both sides are long, a dq kernel (queries held) and a dk/dv kernel (keys held) split
the work. Eq. 5's sum over heads reads a per-head buffer in a fixed order: deterministic, no atomics.

fp32 inputs run their dots on tensor cores in TF32 (operands rounded to 10 mantissa bits, fp32 accumulation;
about 1e-3 relative error, see the GPU tolerances in tests/test_conditioned_attention.py). Addresses are
64-bit (batch, head and row offsets), so tensors past 2^31 elements are read correctly. The host side
registers the forward and backward as torch.library ops, reclmis::conditioned_attention_fwd / _bwd, with
fake kernels and autograd, so torch.compile(fullgraph=True) and CUDA graphs take them whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from reclmis.ops.conditioned_attention import REWEIGHT_EPS

_LOG2E = tl.constexpr(1.4426950408889634)
_EPS = tl.constexpr(REWEIGHT_EPS)
_TAIL = tl.constexpr(16)  # rows of the last blocks of a streamed side (the smallest tensor-core tile)


@triton.jit
def _load_rows(Base, rows, n, stride, D: tl.constexpr):
    """Rows ``rows`` (int64, zero past ``n``) of an (n, D) matrix with row stride ``stride``."""
    offs_d = tl.arange(0, D)
    return tl.load(Base + rows[:, None] * stride + offs_d[None, :], mask=rows[:, None] < n, other=0.0)


@triton.jit
def _store_rows(Base, rows, n, stride, value, D: tl.constexpr):
    """Store ``value`` (len(rows), D) into rows ``rows`` (int64, those below ``n``), cast to Base's type."""
    offs_d = tl.arange(0, D)
    tl.store(
        Base + rows[:, None] * stride + offs_d[None, :],
        value.to(Base.dtype.element_ty),
        mask=rows[:, None] < n,
    )


@triton.jit
def _span(start, BLOCK: tl.constexpr):
    """Indices start .. start + BLOCK - 1 in int64, for 64-bit address arithmetic."""
    return start + tl.arange(0, BLOCK).to(tl.int64)


@triton.jit
def _key_terms(Cond, Mask, cols, Nk, scn, smn, scale, MODE_SCALE: tl.constexpr, HAS_MASK: tl.constexpr):
    """Condition c_j, slope a_j (natural units) and base-2 bias b_j of Eq. 1 for keys ``cols`` of a sample."""
    in_range = cols < Nk
    c = tl.load(Cond + cols * scn, mask=in_range, other=0.0).to(tl.float32)
    valid = in_range
    if HAS_MASK:
        valid = valid & (tl.load(Mask + cols * smn, mask=in_range, other=0) != 0)
    if MODE_SCALE:
        slope = c * scale
        bias = tl.where(valid, 0.0, float("-inf"))
    else:
        slope = tl.zeros_like(c) + scale
        bias = tl.where(valid, tl.log2(c + _EPS), float("-inf"))
    return c, slope, bias


@triton.jit
def _fwd_kernel(
    Q, K, V, Cond, Mask, Out, Lse,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, scb, scn, smb, smn,
    H, Nq, Nk, scale,
    MODE_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Eq. 1-3 for BLOCK_M queries of one (b, h): grid (cdiv(Nq, BLOCK_M), B * H)."""
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = _span(tl.program_id(0) * BLOCK_M, BLOCK_M)
    q = _load_rows(Q + b * sqb + h * sqh, rows, Nq, sqn, D)
    K += b * skb + h * skh
    V += b * svb + h * svh
    Cond += b * scb
    Mask += b * smb
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of t over the valid keys seen so far
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        cols = _span(start_n, BLOCK_N)
        _, a, bias = _key_terms(Cond, Mask, cols, Nk, scn, smn, scale, MODE_SCALE, HAS_MASK)
        k = _load_rows(K, cols, Nk, skn, D)
        v = _load_rows(V, cols, Nk, svn, D)
        t = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (a * _LOG2E)[None, :] + bias[None, :]
        m_new = tl.maximum(m, tl.max(t, 1))
        m_exp = tl.where(m_new == float("-inf"), 0.0, m_new)  # finite stand-in, only inside exp2
        alpha = tl.math.exp2(m - m_exp)  # 0 while no valid key was seen
        p = tl.math.exp2(t - m_exp[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m = m_new
    has_key = l > 0.0
    l = tl.where(has_key, l, 1.0)  # a row without a valid key: acc = 0, zero output
    _store_rows(Out + b * sob + h * soh, rows, Nq, son, acc / l[:, None], D)
    tl.store(Lse + bh * Nq + rows, tl.where(has_key, m + tl.log2(l), float("inf")), mask=rows < Nq)


@triton.jit
def _scores_and_grads(q, do, lse, delta, k, v, a, bias, PRECISION: tl.constexpr):
    """q.k^T, P (Eq. 2) and dS = P (dO.v^T - delta) of one (query block, key block) tile."""
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    p = tl.math.exp2(qk * (a * _LOG2E)[None, :] + bias[None, :] - lse[:, None])
    ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
    return qk, p, ds


@triton.jit
def _cond_grad_sum(ds, qk, MODE_SCALE: tl.constexpr):
    """Per key, the tile's part of the query sum in Eq. 5 (before the factor scale or 1/(cond + eps))."""
    if MODE_SCALE:
        return tl.sum(ds * qk, 0)
    else:
        return tl.sum(ds, 0)


@triton.jit
def _cond_grad(dc_sum, c, scale, MODE_SCALE: tl.constexpr):
    """One head's term of Eq. 5 from the query sum of ``_cond_grad_sum``."""
    if MODE_SCALE:
        return dc_sum * scale
    else:
        return dc_sum / (c + _EPS)


@triton.jit
def _kv_step(
    Q, dOut, Out, Lse, Delta, dQ, sqn, sdon, son, sdqn, start_m, Nq,
    k, v, a, bias, dk, dv, dc,
    MODE_SCALE: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, WITH_DQ: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One block of queries against the key block held by ``_bwd_kv_kernel``: accumulates dk, dv, dcond."""
    rows = _span(start_m, BLOCK)
    q = _load_rows(Q, rows, Nq, sqn, D)
    do = _load_rows(dOut, rows, Nq, sdon, D)
    lse = tl.load(Lse + rows, mask=rows < Nq, other=float("inf"))
    if WITH_DQ:  # this program reads the block's O once: delta here
        delta = tl.sum(do.to(tl.float32) * _load_rows(Out, rows, Nq, son, D).to(tl.float32), 1)
    else:
        delta = tl.load(Delta + rows, mask=rows < Nq, other=0.0)
    qk, p, ds = _scores_and_grads(q, do, lse, delta, k, v, a, bias, PRECISION)
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=PRECISION)
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PRECISION)
    dc += _cond_grad_sum(ds, qk, MODE_SCALE)
    if WITH_DQ:  # the program holds every key: this block's dq is complete
        dq = tl.dot((ds * a[None, :]).to(k.dtype), k, input_precision=PRECISION)
        _store_rows(dQ, rows, Nq, sdqn, dq, D)
    return dk, dv, dc


@triton.jit
def _bwd_kv_kernel(
    Q, K, V, Cond, Mask, Out, dOut, Lse, Delta, dQ, dK, dV, dCondH,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sdob, sdoh, sdon,
    sdqb, sdqh, sdqn, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, scb, scn, smb, smn,
    H, Nq, Nk, scale,
    MODE_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, WITH_DQ: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dk, dv (Eq. 4) and this head's term of dcond (Eq. 5) for BLOCK_N keys, streaming the queries.

    WITH_DQ (one key block holds all keys): also delta and dq, so one launch computes the whole backward.
    Otherwise delta comes from ``_bwd_q_kernel``. grid (cdiv(Nk, BLOCK_N), B * H).
    """
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    cols = _span(tl.program_id(0) * BLOCK_N, BLOCK_N)
    c, a, bias = _key_terms(Cond + b * scb, Mask + b * smb, cols, Nk, scn, smn, scale, MODE_SCALE, HAS_MASK)
    k = _load_rows(K + b * skb + h * skh, cols, Nk, skn, D)
    v = _load_rows(V + b * svb + h * svh, cols, Nk, svn, D)
    Q += b * sqb + h * sqh
    dOut += b * sdob + h * sdoh
    Out += b * sob + h * soh
    dQ += b * sdqb + h * sdqh
    Lse += bh * Nq
    Delta += bh * Nq
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    dc = tl.zeros([BLOCK_N], tl.float32)
    n_full = Nq - Nq % BLOCK_M
    for start_m in range(0, n_full, BLOCK_M):
        dk, dv, dc = _kv_step(
            Q, dOut, Out, Lse, Delta, dQ, sqn, sdon, son, sdqn, start_m, Nq, k, v, a, bias, dk, dv, dc,
            MODE_SCALE, D, BLOCK_M, WITH_DQ, PRECISION,
        )  # fmt: skip
    for start_m in range(n_full, Nq, _TAIL):
        dk, dv, dc = _kv_step(
            Q, dOut, Out, Lse, Delta, dQ, sqn, sdon, son, sdqn, start_m, Nq, k, v, a, bias, dk, dv, dc,
            MODE_SCALE, D, _TAIL, WITH_DQ, PRECISION,
        )  # fmt: skip
    _store_rows(dK + b * sdkb + h * sdkh, cols, Nk, sdkn, dk * a[:, None], D)
    _store_rows(dV + b * sdvb + h * sdvh, cols, Nk, sdvn, dv, D)
    tl.store(dCondH + bh * Nk + cols, _cond_grad(dc, c, scale, MODE_SCALE), mask=cols < Nk)


@triton.jit
def _q_step(
    K, V, Cond, Mask, dK, dV, dCondH, skn, svn, scn, smn, sdkn, sdvn, start_n, Nk, scale,
    q, do, lse, delta, dq,
    MODE_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
    WITH_DKDV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One block of keys against the queries held by ``_bwd_q_kernel``: accumulates dq."""
    cols = _span(start_n, BLOCK)
    c, a, bias = _key_terms(Cond, Mask, cols, Nk, scn, smn, scale, MODE_SCALE, HAS_MASK)
    k = _load_rows(K, cols, Nk, skn, D)
    v = _load_rows(V, cols, Nk, svn, D)
    qk, p, ds = _scores_and_grads(q, do, lse, delta, k, v, a, bias, PRECISION)
    dq = tl.dot((ds * a[None, :]).to(k.dtype), k, dq, input_precision=PRECISION)
    if WITH_DKDV:  # the program holds every query: this block's dk, dv and dcond term are complete
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION) * a[:, None]
        _store_rows(dK, cols, Nk, sdkn, dk, D)
        _store_rows(dV, cols, Nk, sdvn, dv, D)
        tl.store(
            dCondH + cols,
            _cond_grad(_cond_grad_sum(ds, qk, MODE_SCALE), c, scale, MODE_SCALE),
            mask=cols < Nk,
        )
    return dq


@triton.jit
def _bwd_q_kernel(
    Q, K, V, Cond, Mask, Out, dOut, Lse, Delta, dQ, dK, dV, dCondH,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sdob, sdoh, sdon,
    sdqb, sdqh, sdqn, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, scb, scn, smb, smn,
    H, Nq, Nk, scale,
    MODE_SCALE: tl.constexpr, HAS_MASK: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, WITH_DKDV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """delta and dq (Eq. 4) for BLOCK_M queries of a (b, h), streaming the keys.

    WITH_DKDV (one query block holds all queries): also dk, dv and this head's term of dcond, so one launch
    computes the whole backward. Otherwise it stores delta for ``_bwd_kv_kernel``. grid (cdiv(Nq, BLOCK_M), B*H).
    """
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = _span(tl.program_id(0) * BLOCK_M, BLOCK_M)
    q = _load_rows(Q + b * sqb + h * sqh, rows, Nq, sqn, D)
    do = _load_rows(dOut + b * sdob + h * sdoh, rows, Nq, sdon, D)
    delta = tl.sum(
        do.to(tl.float32) * _load_rows(Out + b * sob + h * soh, rows, Nq, son, D).to(tl.float32), 1
    )
    lse = tl.load(Lse + bh * Nq + rows, mask=rows < Nq, other=float("inf"))
    if not WITH_DKDV:
        tl.store(Delta + bh * Nq + rows, delta, mask=rows < Nq)
    K += b * skb + h * skh
    V += b * svb + h * svh
    Cond += b * scb
    Mask += b * smb
    dK += b * sdkb + h * sdkh
    dV += b * sdvb + h * sdvh
    dCondH += bh * Nk
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    n_full = Nk - Nk % BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _q_step(
            K, V, Cond, Mask, dK, dV, dCondH, skn, svn, scn, smn, sdkn, sdvn, start_n, Nk, scale,
            q, do, lse, delta, dq, MODE_SCALE, HAS_MASK, D, BLOCK_N, WITH_DKDV, PRECISION,
        )  # fmt: skip
    for start_n in range(n_full, Nk, _TAIL):
        dq = _q_step(
            K, V, Cond, Mask, dK, dV, dCondH, skn, svn, scn, smn, sdkn, sdvn, start_n, Nk, scale,
            q, do, lse, delta, dq, MODE_SCALE, HAS_MASK, D, _TAIL, WITH_DKDV, PRECISION,
        )  # fmt: skip
    _store_rows(dQ + b * sdqb + h * sdqh, rows, Nq, sdqn, dq, D)


# ---------------------------------------------------------------------------------------------------------
# Launch plan


@dataclass(frozen=True)
class Plan:
    """Tile sizes and kernels of one call; a function of the shapes and dtype only (no data, no host sync).

    ``backward`` is "keys" (one launch of ``_bwd_kv_kernel`` holding all keys), "queries" (one launch of
    ``_bwd_q_kernel`` holding all queries) or "general" (``_bwd_q_kernel`` then ``_bwd_kv_kernel``).
    """

    forward: dict
    backward: str
    bwd_q: dict | None
    bwd_kv: dict | None


# Tile budgets in elements of a row-major (rows, D) tile; fp32 rows count double (their registers do).
# HELD: the side a backward program keeps (k and v with fp32 dk, dv accumulators, or q and dO with an fp32
# dq accumulator); at D=128 that is 32 tokens, the 18-word text of the paper's two regimes. STREAM: a block
# of the other side, at most 32 rows. FORWARD: the forward's query and key blocks, at most 64 rows.
# Chosen, with the warps and stages below, by compiling every launch at the paper shapes for sm_86 and sm_90
# (no spills, shared memory within sm_86's 99 KiB): see tools/kernel_report.
HELD_ELEMENTS = 4096
STREAM_ELEMENTS = 4096
FORWARD_ELEMENTS = 8192


def _rows(n: int, cap: int) -> int:
    """A power-of-two tile of at least 16 rows (the tensor-core minimum) covering n rows, at most cap."""
    return min(max(16, triton.next_power_of_2(n)), cap)


def plan(nq: int, nk: int, d: int, dtype: torch.dtype, mode: str, has_mask: bool) -> Plan:
    """Tiles and kernels for q (.., nq, d) and k (.., nk, d) of ``dtype``."""
    wide = dtype == torch.float32
    row = d * (2 if wide else 1)
    held = max(16, min(128, HELD_ELEMENTS // d))
    stream = max(16, min(32, STREAM_ELEMENTS // row))
    fwd_block = max(16, min(64, FORWARD_ELEMENTS // row))
    common = {
        "MODE_SCALE": mode == "scale",
        "HAS_MASK": has_mask,
        "D": d,
        # fp32 inputs run on tensor cores as TF32 (10-bit mantissa products, fp32 accumulation); the
        # three-pass tf32x3 doubles the dot operands' registers and spills in the backward at D=128.
        "PRECISION": "tf32",
    }
    forward = {
        **common,
        "BLOCK_M": _rows(nq, fwd_block),
        "BLOCK_N": _rows(nk, fwd_block),
        "num_warps": 8 if d >= 128 and not wide else 4,
        "num_stages": 2,
    }
    launch = {"num_warps": 4 if d < 64 or (wide and d >= 128) else 8, "num_stages": 1 if wide else 2}
    if nk <= held and (nk <= nq or nq > held):
        kv = {**common, **launch, "BLOCK_N": _rows(nk, held), "BLOCK_M": stream, "WITH_DQ": True}
        return Plan(forward, "keys", None, kv)
    if nq <= held:
        q = {**common, **launch, "BLOCK_M": _rows(nq, held), "BLOCK_N": stream, "WITH_DKDV": True}
        return Plan(forward, "queries", q, None)
    q = {**common, **launch, "BLOCK_M": held, "BLOCK_N": stream, "WITH_DKDV": False}
    kv = {**common, **launch, "BLOCK_N": held, "BLOCK_M": stream, "WITH_DQ": False}
    return Plan(forward, "general", q, kv)


# ---------------------------------------------------------------------------------------------------------
# Host side: torch.library ops (capturable: no host sync, allocations depend on shapes only)


_INTERPRETED = isinstance(_fwd_kernel, InterpretedFunction)


def interpreted() -> bool:
    """Whether this module's kernels run in the Triton interpreter (TRITON_INTERPRET=1 when first imported)."""
    return _INTERPRETED


def _check_runnable(q: torch.Tensor) -> None:
    if q.device.type != "cuda" and not interpreted():
        raise RuntimeError(
            f"the conditioned_attention Triton kernels were compiled for the GPU but got {q.device} tensors: "
            "on CPU they run only in the interpreter, and TRITON_INTERPRET=1 must be set before "
            "reclmis.kernels.conditioned_attention is first imported"
        )


def _rows_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, token) strides of a (B, H, N, D) tensor whose last dimension is contiguous."""
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _empty_rows_like(t: torch.Tensor) -> torch.Tensor:
    """A new tensor shaped like ``t`` with t's layout when its last dimension is contiguous, else contiguous."""
    layout = torch.preserve_format if t.stride(-1) == 1 else torch.contiguous_format
    return torch.empty_like(t, memory_format=layout)


def _mask_arg(cond: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, int, int]:
    """The mask as bytes with its strides; without a mask, cond stands in (never read: HAS_MASK is False)."""
    if mask is None:
        return cond, 0, 0
    return mask.view(torch.uint8), mask.stride(0), mask.stride(1)


@torch.library.custom_op("reclmis::conditioned_attention_fwd", mutates_args=())
def conditioned_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cond: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],  # noqa: UP045 (the schema inference needs typing's form)
    mode: str,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1-3: out (B, H, Nq, D) in q's dtype and lse (B, H, Nq) fp32, base 2, +inf for a row without key."""
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    b, h, nq, d = q.shape
    nk = k.shape[2]
    params = plan(nq, nk, d, q.dtype, mode, key_padding_mask is not None).forward
    out = _empty_rows_like(q)
    lse = q.new_empty((b, h, nq), dtype=torch.float32)
    mask, smb, smn = _mask_arg(cond, key_padding_mask)
    _fwd_kernel[(triton.cdiv(nq, params["BLOCK_M"]), b * h)](
        q, k, v, cond, mask, out, lse,
        *_rows_strides(q), *_rows_strides(k), *_rows_strides(v), *_rows_strides(out),
        cond.stride(0), cond.stride(1), smb, smn, h, nq, nk, scale, **params,
    )  # fmt: skip
    return out, lse


@conditioned_attention_fwd.register_fake
def _(q, k, v, cond, key_padding_mask, mode, scale):
    return _empty_rows_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("reclmis::conditioned_attention_bwd", mutates_args=())
def conditioned_attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cond: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],  # noqa: UP045
    out: torch.Tensor,
    lse: torch.Tensor,
    mode: str,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 4-5: (dq, dk, dv, dcond), dcond summed over heads in a fixed order (deterministic)."""
    dout, q, k, v, out = (_unit_last_stride(t) for t in (dout, q, k, v, out))
    b, h, nq, d = q.shape
    nk = k.shape[2]
    launch = plan(nq, nk, d, q.dtype, mode, key_padding_mask is not None)
    dq, dk, dv = (_empty_rows_like(t) for t in (q, k, v))
    dcond_per_head = q.new_empty((b, h, nk), dtype=torch.float32)  # Eq. 5 before the sum over heads
    delta = torch.empty_like(lse) if launch.backward == "general" else lse  # rowsum(dO * O), (B, H, Nq)
    mask, smb, smn = _mask_arg(cond, key_padding_mask)
    args = (
        q, k, v, cond, mask, out, dout, lse, delta, dq, dk, dv, dcond_per_head,
        *_rows_strides(q), *_rows_strides(k), *_rows_strides(v), *_rows_strides(out), *_rows_strides(dout),
        *_rows_strides(dq), *_rows_strides(dk), *_rows_strides(dv), cond.stride(0), cond.stride(1), smb, smn,
        h, nq, nk, scale,
    )  # fmt: skip
    if launch.bwd_q is not None:  # first: it stores delta for the dk/dv kernel of the general path
        _bwd_q_kernel[(triton.cdiv(nq, launch.bwd_q["BLOCK_M"]), b * h)](*args, **launch.bwd_q)
    if launch.bwd_kv is not None:
        _bwd_kv_kernel[(triton.cdiv(nk, launch.bwd_kv["BLOCK_N"]), b * h)](*args, **launch.bwd_kv)
    return dq, dk, dv, dcond_per_head.sum(1).to(cond.dtype)


@conditioned_attention_bwd.register_fake
def _(dout, q, k, v, cond, key_padding_mask, out, lse, mode, scale):
    return (*(_empty_rows_like(t) for t in (q, k, v)), cond.new_empty(cond.shape))


def _setup_context(ctx, inputs: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v, cond, key_padding_mask, mode, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, cond, key_padding_mask, out, lse)
    ctx.mode, ctx.scale = mode, scale
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zeros launched for lse's gradient, which is never used


def _backward(ctx, dout: torch.Tensor, _dlse: None) -> tuple[torch.Tensor | None, ...]:
    q, k, v, cond, key_padding_mask, out, lse = ctx.saved_tensors
    grads = conditioned_attention_bwd(dout, q, k, v, cond, key_padding_mask, out, lse, ctx.mode, ctx.scale)
    return *grads, None, None, None


conditioned_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


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
    return conditioned_attention_fwd(q, k, v, cond, key_padding_mask, mode, scale)[0]
