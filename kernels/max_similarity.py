"""Fused bidirectional weighted max-similarity (paper Eq. 4-5, DESIGN section 3.2) in Triton.

Forward, one program per (image a, text b) pair, the tile sim_ab = vhat_a ehat_b^T (N, L) on chip only:

    S[a, b] = 0.5 * ( sum_i wI[a,i] max_{j valid} sim_ab[i,j] + sum_{j valid} wT[b,j] max_i sim_ab[i,j] )  (Eq. 4-5)

with vhat = r * v, r = 1 / max(||v||, eps) computed once per token by a pre-pass (normalize=True), or
r = 1. Only the argmax indices jr (Bi, Bt, N) and ic (Bi, Bt, L) are saved, int32, -1 where nothing is
selected (padded tokens, texts without a valid token). Ties go to the first index (the reference's amax
splits the gradient evenly; continuous inputs do not tie).

Backward. With g_ab = 0.5 dL/dS[a,b], the derivative of S[a,b] w.r.t. the tile is the sparse matrix

    P_ab[i,j] = g_ab * ( wI[a,i] [j == jr_abi] + wT[b,j] [i == ic_abj] )                              (B1)

so, as in attention's backward,

    d vhat_a = sum_b P_ab ehat_b,          d ehat_b = sum_a P_ab^T vhat_a                              (B2)
    d wI[a,i] = sum_b g_ab sim_ab[i, jr_abi],   d wT[b,j] = sum_a g_ab sim_ab[ic_abj, j]               (B3)
    d v = r * (d vhat - vhat <vhat, d vhat>)   (the backward of F.normalize; d v = r d vhat if ||v|| <= eps)  (B4)

Each backward program owns one block of its output and loops over the other batch, rebuilding P_ab from
the indices and the tile from the inputs, so there are no atomics: partial sums over channel blocks and
image groups go to small buffers that torch reduces in a fixed order, and two backward passes agree
bitwise. Extra memory: the indices and those buffers, O(Bi*Bt*(N+L)) + O(inputs).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

NORM_EPS = 1e-12  # F.normalize's default
ROWS_PER_PROGRAM, NORM_BLOCK_C = 16, 64  # tile of the normalisation pre-pass and of its backward


@triton.jit
def _inv_norm_kernel(x_ptr, r_ptr, R, C, eps, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """r = 1 / max(||x||, eps) in fp32 for BLOCK_R rows of the contiguous (R, C) x."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    sumsq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        mask = (rows < R)[:, None] & (c0 + offs_c < C)[None, :]
        x = tl.load(x_ptr + rows[:, None] * C + c0 + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
        sumsq += tl.sum(x * x, axis=1)
    tl.store(r_ptr + rows, 1.0 / tl.maximum(tl.sqrt(sumsq), eps), mask=rows < R)


@triton.jit
def _max_similarity_fwd_kernel(
    img_ptr, txt_ptr, img_w_ptr, txt_w_ptr, valid_ptr, img_r_ptr, txt_r_ptr,
    s_ptr, img_idx_ptr, txt_idx_ptr,
    Bt, N, L, C,
    NORMALIZE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Eq. 4-5 for the pair (a, b): S[a, b], jr_ab (N,) and ic_ab (L,)."""
    a = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    img_ptr += a * N * C  # 64-bit offsets to the pair's rows, 32-bit offsets within them
    txt_ptr += b * L * C
    img_idx_ptr += (a * Bt + b) * N
    txt_idx_ptr += (a * Bt + b) * L
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    offs_c = tl.arange(0, BLOCK_C)
    valid = tl.load(valid_ptr + b * L + offs_l, mask=offs_l < L, other=0) != 0  # (BLOCK_L,)
    any_valid = tl.max(valid.to(tl.int32), axis=0) > 0
    w_t = tl.load(txt_w_ptr + b * L + offs_l, mask=valid, other=0.0).to(tl.float32)
    if NORMALIZE:
        r_t = tl.load(txt_r_ptr + b * L + offs_l, mask=valid, other=0.0)
    col_max = tl.full([BLOCK_L], float("-inf"), tl.float32)
    col_arg = tl.zeros([BLOCK_L], tl.int32)
    s_img = tl.zeros([BLOCK_N], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + offs_n
        row_in = rows < N
        sim = tl.zeros([BLOCK_N, BLOCK_L], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + offs_c
            x = tl.load(
                img_ptr + rows[:, None] * C + cols[None, :],
                mask=row_in[:, None] & (cols < C)[None, :],
                other=0.0,
            )
            e = tl.load(
                txt_ptr + offs_l[:, None] * C + cols[None, :],
                mask=valid[:, None] & (cols < C)[None, :],
                other=0.0,
            )
            sim = tl.dot(x, tl.trans(e), sim, input_precision=PRECISION)
        if NORMALIZE:
            r_i = tl.load(img_r_ptr + a * N + rows, mask=row_in, other=0.0)
            sim = sim * r_i[:, None] * r_t[None, :]
        # Eq. 4: each image token's best valid text token.
        row_max, row_arg = tl.max(tl.where(valid[None, :], sim, float("-inf")), axis=1, return_indices=True)
        w_i = tl.load(img_w_ptr + a * N + rows, mask=row_in, other=0.0).to(tl.float32)
        s_img += w_i * tl.where(row_in & any_valid, row_max, 0.0)
        tl.store(img_idx_ptr + rows, tl.where(any_valid, row_arg, -1), mask=row_in)
        # Eq. 5: each text token's best image token, a running max over the row blocks.
        blk_max, blk_arg = tl.max(tl.where(row_in[:, None], sim, float("-inf")), axis=0, return_indices=True)
        better = blk_max > col_max
        col_max = tl.where(better, blk_max, col_max)
        col_arg = tl.where(better, blk_arg + n0, col_arg)
    s_txt = tl.sum(tl.where(valid, w_t * col_max, 0.0), axis=0)
    tl.store(s_ptr + a * Bt + b, 0.5 * (tl.sum(s_img, axis=0) + s_txt))
    tl.store(txt_idx_ptr + offs_l, tl.where(valid, col_arg, -1), mask=offs_l < L)


@triton.jit
def _max_similarity_bwd_img_kernel(
    img_ptr, txt_ptr, img_w_ptr, txt_w_ptr, valid_ptr, img_r_ptr, txt_r_ptr, ds_ptr, img_idx_ptr, txt_idx_ptr,
    d_img_ptr, d_img_w_ptr,
    Bi, Bt, N, L, C,
    NORMALIZE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Eq. B2-B3, image side: d vhat[a, rows, cols] (fp32) and this channel block's part of d wI[a, rows]."""
    a = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_l = tl.arange(0, BLOCK_L)
    tile_mask = (rows < N)[:, None] & (cols < C)[None, :]
    img_ptr += a * N * C
    d_img_ptr += a * N * C
    ds_ptr += a * Bt
    img_idx_ptr += a * Bt * N
    txt_idx_ptr += a * Bt * L
    x = tl.load(img_ptr + rows[:, None] * C + cols[None, :], mask=tile_mask, other=0.0)
    w_i = tl.load(img_w_ptr + a * N + rows, mask=rows < N, other=0.0).to(tl.float32)
    d_x = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    d_w = tl.zeros([BLOCK_N], tl.float32)
    for b in range(Bt):
        g = 0.5 * tl.load(ds_ptr + b)
        valid = tl.load(valid_ptr + b * L + offs_l, mask=offs_l < L, other=0) != 0
        e = tl.load(
            txt_ptr + offs_l[:, None] * C + cols[None, :],
            mask=valid[:, None] & (cols < C)[None, :],
            other=0.0,
        )
        w_t = tl.load(txt_w_ptr + b * L + offs_l, mask=valid, other=0.0).to(tl.float32)
        r_t = tl.load(txt_r_ptr + b * L + offs_l, mask=valid, other=0.0) if NORMALIZE else 1.0
        jr = tl.load(img_idx_ptr + b * N + rows, mask=rows < N, other=-1)
        ic = tl.load(txt_idx_ptr + b * L + offs_l, mask=offs_l < L, other=-1)
        hit_row = jr[:, None] == offs_l[None, :]  # (BLOCK_N, BLOCK_L): j == jr_i
        hit_col = ic[None, :] == rows[:, None]  # i == ic_j
        sim = tl.dot(x, tl.trans(e), input_precision=PRECISION) * r_t  # this channel block's part, no r_i yet
        d_w += g * tl.sum(tl.where(hit_row, sim, 0.0), axis=1)
        p = g * r_t * (tl.where(hit_row, w_i[:, None], 0.0) + tl.where(hit_col, w_t[None, :], 0.0))  # Eq. B1
        d_x = tl.dot(p, e.to(tl.float32), d_x, input_precision=PRECISION)
        txt_ptr += L * C
    if NORMALIZE:
        d_w *= tl.load(img_r_ptr + a * N + rows, mask=rows < N, other=0.0)
    tl.store(d_img_ptr + rows[:, None] * C + cols[None, :], d_x, mask=tile_mask)
    tl.store(d_img_w_ptr + (tl.program_id(2) * Bi + a) * N + rows, d_w, mask=rows < N)


@triton.jit
def _max_similarity_bwd_txt_kernel(
    img_ptr, txt_ptr, img_w_ptr, txt_w_ptr, valid_ptr, img_r_ptr, txt_r_ptr, ds_ptr, img_idx_ptr, txt_idx_ptr,
    d_txt_ptr, d_txt_w_ptr,
    Bi, Bt, N, L, C, IMAGES_PER_PROGRAM,
    NORMALIZE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Eq. B2-B3, text side, for text b, a channel block and a group of images: partial d ehat, d wT."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    group = tl.program_id(2)
    offs_l = tl.arange(0, BLOCK_L)
    offs_n = tl.arange(0, BLOCK_N)
    valid = tl.load(valid_ptr + b * L + offs_l, mask=offs_l < L, other=0) != 0
    e_ptrs = txt_ptr + b * L * C + offs_l[:, None] * C + cols[None, :]
    e = tl.load(e_ptrs, mask=valid[:, None] & (cols < C)[None, :], other=0.0)
    w_t = tl.load(txt_w_ptr + b * L + offs_l, mask=valid, other=0.0).to(tl.float32)
    d_e = tl.zeros([BLOCK_L, BLOCK_C], tl.float32)
    d_w = tl.zeros([BLOCK_L], tl.float32)
    a_start = group * IMAGES_PER_PROGRAM
    img_ptr += a_start.to(tl.int64) * N * C
    for a in range(a_start, tl.minimum(a_start + IMAGES_PER_PROGRAM, Bi)):
        pair = a * Bt + b
        g = 0.5 * tl.load(ds_ptr + pair)
        ic = tl.load(txt_idx_ptr + pair * L + offs_l, mask=offs_l < L, other=-1)
        for n0 in range(0, N, BLOCK_N):
            rows = n0 + offs_n
            row_in = rows < N
            x = tl.load(  # (BLOCK_C, BLOCK_N), image a's tokens as columns
                img_ptr + rows[None, :] * C + cols[:, None],
                mask=row_in[None, :] & (cols < C)[:, None],
                other=0.0,
            )
            w_i = tl.load(img_w_ptr + a * N + rows, mask=row_in, other=0.0).to(tl.float32)
            r_i = tl.load(img_r_ptr + a * N + rows, mask=row_in, other=0.0) if NORMALIZE else 1.0
            jr = tl.load(img_idx_ptr + pair * N + rows, mask=row_in, other=-1)
            hit_row = jr[None, :] == offs_l[:, None]  # (BLOCK_L, BLOCK_N): j == jr_i
            hit_col = ic[:, None] == rows[None, :]  # i == ic_j
            sim = tl.dot(e, x, input_precision=PRECISION) * r_i  # this channel block's part, no r_t yet
            d_w += g * tl.sum(tl.where(hit_col, sim, 0.0), axis=1)
            # Eq. B1, transposed
            p = g * r_i * (tl.where(hit_row, w_i[None, :], 0.0) + tl.where(hit_col, w_t[:, None], 0.0))
            d_e = tl.dot(p, tl.trans(x.to(tl.float32)), d_e, input_precision=PRECISION)
        img_ptr += N * C
    if NORMALIZE:
        d_w *= tl.load(txt_r_ptr + b * L + offs_l, mask=valid, other=0.0)
    out_rows = (group * Bt + b) * L + offs_l  # row of the (groups * Bt * L) partial sums
    tl.store(
        d_txt_ptr + out_rows[:, None] * C + cols[None, :],
        d_e,
        mask=(offs_l < L)[:, None] & (cols < C)[None, :],
    )
    tl.store(d_txt_w_ptr + tl.program_id(1) * tl.num_programs(2) * Bt * L + out_rows, d_w, mask=offs_l < L)


@triton.jit
def _normalize_bwd_kernel(
    x_ptr, r_ptr, dy_ptr, dx_ptr, R, C, eps, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    """Eq. B4 for BLOCK_R rows of the contiguous (R, C) x: dx = r (dy - r^2 <x, dy> x), or r dy if ||x|| <= eps."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    r = tl.load(r_ptr + rows, mask=rows < R, other=0.0)
    sumsq = tl.zeros([BLOCK_R], dtype=tl.float32)
    x_dy = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        mask = (rows < R)[:, None] & (c0 + offs_c < C)[None, :]
        offs = rows[:, None] * C + c0 + offs_c[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0)
        sumsq += tl.sum(x * x, axis=1)
        x_dy += tl.sum(x * dy, axis=1)
    proj = tl.where(tl.sqrt(sumsq) > eps, r * r * x_dy, 0.0)
    for c0 in range(0, C, BLOCK_C):
        mask = (rows < R)[:, None] & (c0 + offs_c < C)[None, :]
        offs = rows[:, None] * C + c0 + offs_c[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0)
        dx = r[:, None] * (dy - proj[:, None] * x)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (CPU tensors allowed) rather than compiled.

    triton.jit fixes the flavour from TRITON_INTERPRET at decoration time: for triton's own library (tl.sum,
    tl.max) when triton is first imported, for these kernels when this module is. Mixed flavours cannot run.
    """
    ours = isinstance(_max_similarity_fwd_kernel, InterpretedFunction)
    if ours != isinstance(tl.sum, InterpretedFunction):
        raise RuntimeError(
            "TRITON_INTERPRET changed between the first import of triton and that of "
            "reclmis.kernels.max_similarity; set it (or leave it unset) before triton is first imported"
        )
    return ours


class _Config(NamedTuple):
    """Launch parameters shared by the forward and backward kernels of one call."""

    block_n: int
    block_l: int
    block_c: int
    precision: str
    num_warps: int

    @staticmethod
    def of(n: int, l: int, c: int, dtype: torch.dtype) -> _Config:
        """All L (<= 77 in practice) text tokens in one tile, 64 image tokens (one Hopper wgmma M); fp32 runs
        3xTF32 (about fp32 accuracy), fp16/bf16 multiply exactly with fp32 accumulation and send the fp32
        gradient tiles P of Eq. B1 through TF32 (fp16's mantissa, fp32's range). Channel blocks keep the
        kernels (8 warps) within the register file for fp16/bf16 at L <= 64 on sm_86 and sm_90; fp32 and
        L > 64 spill a little."""
        block_l = max(16, triton.next_power_of_2(l))
        block_c = (64 if block_l <= 64 else 32) if dtype != torch.float32 else (32 if block_l <= 64 else 16)
        return _Config(
            block_n=max(16, min(64, triton.next_power_of_2(n))),
            block_l=block_l,
            block_c=max(16, min(block_c, triton.next_power_of_2(c))),
            precision="tf32x3" if dtype == torch.float32 else "tf32",
            num_warps=8,
        )

    def meta(self, normalize: bool) -> dict[str, object]:
        return {
            "NORMALIZE": normalize,
            "PRECISION": self.precision,
            "BLOCK_N": self.block_n,
            "BLOCK_L": self.block_l,
            "BLOCK_C": self.block_c,
            "num_warps": self.num_warps,
        }


def _target_programs(device: torch.device) -> int:
    """Programs to aim for when splitting the text-side backward over image groups: a few per SM on a GPU;
    on CPU (the interpreter runs programs one by one) a small stand-in so that tests exercise the split."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 16


def _inv_norm(x: torch.Tensor) -> torch.Tensor:
    """1 / max(||x||, eps) over the last dimension, fp32, shape x.shape[:-1]."""
    r = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    _inv_norm_kernel[(triton.cdiv(r.numel(), ROWS_PER_PROGRAM),)](
        x, r, r.numel(), x.shape[-1], NORM_EPS, BLOCK_R=ROWS_PER_PROGRAM, BLOCK_C=NORM_BLOCK_C
    )
    return r


def _normalize_backward(x: torch.Tensor, r: torch.Tensor, d_xhat: torch.Tensor) -> torch.Tensor:
    """Eq. B4: the gradient w.r.t. x of F.normalize(x) given d_xhat (fp32), in x's dtype."""
    dx = torch.empty_like(x)
    _normalize_bwd_kernel[(triton.cdiv(r.numel(), ROWS_PER_PROGRAM),)](
        x, r, d_xhat, dx, r.numel(), x.shape[-1], NORM_EPS, BLOCK_R=ROWS_PER_PROGRAM, BLOCK_C=NORM_BLOCK_C
    )
    return dx


class MaxSimilarityFunction(torch.autograd.Function):
    """Autograd glue: pre-pass and forward kernel (Eq. 4-5), backward kernels (Eq. B1-B4)."""

    @staticmethod
    def forward(
        ctx,
        img: torch.Tensor,  # (Bi, N, C), contiguous
        txt: torch.Tensor,  # (Bt, L, C), contiguous
        img_weight: torch.Tensor,  # (Bi, N)
        txt_weight: torch.Tensor,  # (Bt, L)
        valid: torch.Tensor,  # (Bt, L) uint8, 1 = valid token
        normalize: bool,
    ) -> torch.Tensor:
        (bi, n, c), (bt, l, _) = img.shape, txt.shape
        cfg = _Config.of(n, l, c, img.dtype)
        if normalize:
            img_r, txt_r = _inv_norm(img), _inv_norm(txt)  # (Bi, N), (Bt, L)
        else:  # never read: the kernels get NORMALIZE=False
            img_r = txt_r = torch.empty(0, dtype=torch.float32, device=img.device)
        s = torch.empty(bi, bt, dtype=torch.float32, device=img.device)
        img_idx = torch.empty(bi, bt, n, dtype=torch.int32, device=img.device)  # jr
        txt_idx = torch.empty(bi, bt, l, dtype=torch.int32, device=img.device)  # ic
        _max_similarity_fwd_kernel[(bi, bt)](
            img, txt, img_weight, txt_weight, valid, img_r, txt_r, s, img_idx, txt_idx, bt, n, l, c,
            **cfg.meta(normalize),
        )  # fmt: skip
        ctx.save_for_backward(img, txt, img_weight, txt_weight, valid, img_r, txt_r, img_idx, txt_idx)
        ctx.normalize, ctx.cfg = normalize, cfg
        return s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_s: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        img, txt, img_weight, txt_weight, valid, img_r, txt_r, img_idx, txt_idx = ctx.saved_tensors
        (bi, n, c), (bt, l, _) = img.shape, txt.shape
        cfg, normalize = ctx.cfg, ctx.normalize
        n_cblocks = triton.cdiv(c, cfg.block_c)
        d_s = d_s.float().contiguous()
        common = (img, txt, img_weight, txt_weight, valid, img_r, txt_r, d_s, img_idx, txt_idx)
        f32 = {"dtype": torch.float32, "device": img.device}
        d_img = d_txt = d_img_w = d_txt_w = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            d_img_hat = torch.empty(bi, n, c, **f32)
            d_img_w_parts = torch.empty(n_cblocks, bi, n, **f32)
            _max_similarity_bwd_img_kernel[(bi, triton.cdiv(n, cfg.block_n), n_cblocks)](
                *common, d_img_hat, d_img_w_parts, bi, bt, n, l, c, **cfg.meta(normalize)
            )
            if ctx.needs_input_grad[0]:
                d_img = _normalize_backward(img, img_r, d_img_hat) if normalize else d_img_hat.to(img.dtype)
            if ctx.needs_input_grad[2]:
                d_img_w = d_img_w_parts.sum(0).to(img_weight.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            groups = max(1, min(bi, _target_programs(img.device) // (bt * n_cblocks)))
            images_per_program = triton.cdiv(bi, groups)
            groups = triton.cdiv(bi, images_per_program)
            d_txt_hat = torch.empty(groups, bt, l, c, **f32)
            d_txt_w_parts = torch.empty(n_cblocks, groups, bt, l, **f32)
            _max_similarity_bwd_txt_kernel[(bt, n_cblocks, groups)](
                *common, d_txt_hat, d_txt_w_parts, bi, bt, n, l, c, images_per_program, **cfg.meta(normalize)
            )
            d_txt_hat = d_txt_hat.sum(0)
            if ctx.needs_input_grad[1]:
                d_txt = _normalize_backward(txt, txt_r, d_txt_hat) if normalize else d_txt_hat.to(txt.dtype)
            if ctx.needs_input_grad[3]:
                d_txt_w = d_txt_w_parts.sum((0, 1)).to(txt_weight.dtype)
        return d_img, d_txt, d_img_w, d_txt_w, None, None


def max_similarity_triton(
    img: torch.Tensor,
    txt: torch.Tensor,
    img_weight: torch.Tensor,
    txt_weight: torch.Tensor,
    txt_mask: torch.Tensor | None = None,
    *,
    normalize: bool = True,
) -> torch.Tensor:
    """S (Bi, Bt) fp32 of Eq. 4-5 without materialising the (Bi, Bt, N, L) tensor; inputs are checked by
    ``reclmis.ops.max_similarity``. txt_mask (Bt, L) bool, True = valid token (None: all valid)."""
    if img.device.type == "cpu" and not interpreted():
        raise RuntimeError(
            "max_similarity_triton got CPU tensors but its kernels are compiled: running them on CPU takes "
            "Triton's interpreter, i.e. TRITON_INTERPRET=1 set before triton is first imported"
        )
    if txt_mask is None:
        txt_mask = torch.ones(txt.shape[:2], dtype=torch.bool, device=txt.device)
    valid = txt_mask.contiguous().view(torch.uint8)
    return MaxSimilarityFunction.apply(
        img.contiguous(), txt.contiguous(), img_weight.contiguous(), txt_weight.contiguous(), valid, normalize
    )
