"""Fused bidirectional weighted max-similarity (paper Eq. 4-5, DESIGN section 3.2) in Triton.

For image a (tokens vhat_ai, weights wI[a,i]) and text b (valid tokens ehat_bj, weights wT[b,j]), with
sim_ab = vhat_a ehat_b^T:

    S[a,b] = 0.5 * (sum_i wI[a,i] max_{j valid} sim_ab[i,j] + sum_{j valid} wT[b,j] max_i sim_ab[i,j])  (4-5)

where vhat = r * v, r = 1 / max(||v||, eps) (normalize=True), or r = 1.

Forward: the only tensor-core work. Images and texts are flattened to token rows (Bi*N, Bt*L), so neither
N = 196 nor L = 18 is padded to a power of two. A program keeps BLOCK_N consecutive image tokens on chip
(they may belong to two images) and sweeps every tile of BLOCK_L consecutive text tokens past them, one dot
per tile (texts straddle tiles, so each image block is read once and the texts stream past it). Row maxima
(Eq. 4) are taken per text segment of a tile, a text cut by the tile's end carrying its running maximum to
the next tile; column maxima (Eq. 5) per image segment of the block go to small partial buffers that a
second kernel reduces in block order before it forms S. Saved for the backward, O(Bi*Bt*(N+L)):

    row_max[a,b,i] = max_j sim_ab[i,j],  row_arg[a,b,i] = jr   (0 and -1 for a text without valid token)
    col_max[a,b,j] = max_i sim_ab[i,j],  col_arg[a,b,j] = ic   (0 and -1 for a padded token)

Ties go to the first index (the reference's amax splits the gradient evenly; continuous inputs do not tie).

Backward: no similarity is rebuilt. With g_ab = 0.5 dL/dS[a,b], the derivative of S[a,b] w.r.t. sim_ab is
P_ab[i,j] = g_ab (wI[a,i] [j == jr_abi] + wT[b,j] [i == ic_abj]), so

    d wI[a,i] = sum_b g_ab row_max[a,b,i],      d wT[b,j] = sum_a g_ab col_max[a,b,j]                 (B1)
    d vhat_ai = sum_b g_ab (wI[a,i] ehat_b,jr + sum_{j: ic_abj = i} wT[b,j] ehat_bj)                    (B2)
    d ehat_bj = sum_a g_ab (wT[b,j] vhat_a,ic + sum_{i: jr_abi = j} wI[a,i] vhat_ai)                    (B3)
    d v = r (d vhat - vhat <vhat, d vhat>)   (F.normalize's backward; r d vhat where ||v|| <= eps)      (B4)

with <vhat_ai, d vhat_ai> = sum_b g_ab (wI[a,i] row_max[a,b,i] + sum_{j: ic_abj = i} wT[b,j] col_max[a,b,j]),
and likewise for e: B1 and the projections of B4 are reductions of saved maxima. B2 and B3 are gathers of
the selected tokens (ehat_b,jr, vhat_a,ic) and sums of tokens by destination (the image tokens that picked
text token j, the text tokens that picked image token i). A prep kernel sorts each pair's sources by
destination once; the feature kernels gather the sources in that order from tiles they hold on chip and take
each destination's sum as a difference of running sums. No tensor-core work, no atomics: every sum runs in
a fixed order, so two backward passes agree bitwise. The image-side program owns a block of an image's
tokens and a block of channels and loops over the texts; the text-side program owns a tile of texts and a
block of channels and loops over (a group of) the images, reading each image block once for all its texts.

NaN propagates as in the reference: the forward ranks NaN above every value in its maxima (torch.amax's
rule; tl.max skips NaN), so S is NaN wherever a NaN takes part in a maximum or a sum. In the backward a
NaN spreads over no more gradients than the reference's (whose amax backward spreads it over whole rows).

The two passes are the torch.library custom ops ``reclmis::max_similarity_forward`` and
``reclmis::max_similarity_backward`` (with fake kernels and the autograd formula), so torch.compile traces
them, and CUDA graphs capture them, whole.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import _runtime
from ._constants import NORM_EPS

ROWS_PER_PROGRAM, NORM_BLOCK_C = 16, 64  # tile of the text normalisation pre-pass
RESIDENT_BYTES = 64 * 1024  # the forward's image block, kept on chip for the whole text sweep
TEXT_TILE_BYTES = 32 * 1024  # one text tile of that sweep
BWD_TILE_ELEMENTS = 4096  # fp32 elements of the backward's working tiles (rows x channels)
PICK_CHUNK = 16  # text tokens compared with a block of image tokens at a time (the backward's prep kernel)


@triton.jit
def _inverse_norm(sumsq, eps):
    """r = 1 / max(||x||, eps) from sum(x^2), NaN for a NaN norm (as F.normalize's clamp; tl.maximum's
    default may return eps there)."""
    return 1.0 / tl.maximum(tl.sqrt(sumsq), eps, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _nan_on_top(x):
    """x with NaN raised to +inf, the order in which torch.amax takes maxima (a NaN wins); tl.max itself
    skips NaN. ``_top_as_nan`` reads such a maximum back."""
    return tl.where(x != x, float("inf"), x)


@triton.jit
def _top_as_nan(x):
    """A maximum of ``_nan_on_top`` values: +inf is a NaN (or a +inf, which needs infinite or overflowing
    inputs; it reads as NaN as well)."""
    return tl.where(x == float("inf"), float("nan"), x)


@triton.jit
def _max_similarity_forward_norm_kernel(
    x_ptr, r_ptr, R, C, eps, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    """r = 1 / max(||x||, eps) in fp32 for BLOCK_R rows of the contiguous (R, C) x."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    sumsq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        mask = (rows < R)[:, None] & (c0 + offs_c < C)[None, :]
        x = tl.load(x_ptr + rows[:, None] * C + c0 + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
        sumsq += tl.sum(x * x, axis=1)
    tl.store(r_ptr + rows, _inverse_norm(sumsq, eps), mask=rows < R)


@triton.jit
def _max_similarity_forward_kernel(
    img_ptr, txt_ptr, valid_ptr, img_r_ptr, txt_r_ptr,
    row_max_ptr, row_arg_ptr, part_max_ptr, part_arg_ptr,
    Bt, N, L, C, R_img, R_txt, eps,
    NORMALIZE: tl.constexpr, RESIDENT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, SLOTS: tl.constexpr,
):  # fmt: skip
    """Eq. 4 for image tokens [k*BLOCK_N, (k+1)*BLOCK_N) of the flattened (Bi*N, C) img against every text,
    and Eq. 5 restricted to them: the maximum over each image's tokens of the block, per text token."""
    k = tl.program_id(0)
    rows = k * BLOCK_N + tl.arange(0, BLOCK_N)  # a * N + i
    row_in = rows < R_img
    img_of = rows // N
    out_rows = img_of.to(tl.int64) * Bt * N + (rows - img_of * N)  # (a, 0, i) in the (Bi, Bt, N) outputs
    offs_c = tl.arange(0, BLOCK_C)
    img_ptrs = img_ptr + rows.to(tl.int64)[:, None] * C + offs_c[None, :]
    if RESIDENT:  # all C channels of the block, loaded once for the whole sweep
        v = tl.load(img_ptrs, mask=row_in[:, None] & (offs_c < C)[None, :], other=0.0)
    if NORMALIZE:
        sumsq = tl.zeros([BLOCK_N], tl.float32)
        if RESIDENT:
            sumsq += tl.sum(v.to(tl.float32) * v.to(tl.float32), axis=1)
        else:
            for c0 in range(0, C, BLOCK_C):
                x = tl.load(img_ptrs + c0, mask=row_in[:, None] & (c0 + offs_c < C)[None, :], other=0.0)
                sumsq += tl.sum(x.to(tl.float32) * x.to(tl.float32), axis=1)
        r_i = _inverse_norm(sumsq, eps)
        tl.store(img_r_ptr + rows, r_i, mask=row_in)
    first_img = (k * BLOCK_N) // N
    n_imgs = (tl.minimum(k * BLOCK_N + BLOCK_N, R_img) - 1) // N - first_img + 1
    open_max = tl.full([BLOCK_N], float("-inf"), tl.float32)  # running Eq. 4 maximum of a text cut by a tile
    open_arg = tl.zeros([BLOCK_N], tl.int32)
    for t0 in range(0, R_txt, BLOCK_L):
        trows = t0 + tl.arange(0, BLOCK_L)  # b * L + j
        valid = tl.load(valid_ptr + trows, mask=trows < R_txt, other=0) != 0
        txt_ptrs = txt_ptr + trows.to(tl.int64)[:, None] * C + offs_c[None, :]
        if RESIDENT:
            e = tl.load(txt_ptrs, mask=valid[:, None] & (offs_c < C)[None, :], other=0.0)
            sim = tl.dot(v, tl.trans(e), input_precision=PRECISION)  # (BLOCK_N, BLOCK_L)
        else:
            sim = tl.zeros([BLOCK_N, BLOCK_L], tl.float32)
            for c0 in range(0, C, BLOCK_C):
                x = tl.load(img_ptrs + c0, mask=row_in[:, None] & (c0 + offs_c < C)[None, :], other=0.0)
                e = tl.load(txt_ptrs + c0, mask=valid[:, None] & (c0 + offs_c < C)[None, :], other=0.0)
                sim = tl.dot(x, tl.trans(e), sim, input_precision=PRECISION)
        if NORMALIZE:
            r_t = tl.load(txt_r_ptr + trows, mask=valid, other=0.0)
            sim = sim * r_i[:, None] * r_t[None, :]
        sim = _nan_on_top(sim)  # maxima below and in the combine kernel: NaN propagates as in torch.amax
        # Eq. 5, partial: each text token's best token among this block's tokens of each image.
        for s in range(0, n_imgs):
            a = first_img + s
            best, arg = tl.max(
                tl.where((row_in & (img_of == a))[:, None], sim, float("-inf")), axis=0, return_indices=True
            )
            part = (k * SLOTS + s).to(tl.int64) * R_txt + trows
            tl.store(part_max_ptr + part, best, mask=trows < R_txt)
            tl.store(part_arg_ptr + part, k * BLOCK_N + arg - a * N, mask=trows < R_txt)
        # Eq. 4: each image token's best valid token of every text that meets this tile.
        for t in range(t0 // L, tl.minimum((t0 + BLOCK_L - 1) // L, Bt - 1) + 1):
            in_text = valid & (trows >= t * L) & (trows < t * L + L)
            best, arg = tl.max(tl.where(in_text[None, :], sim, float("-inf")), axis=1, return_indices=True)
            arg += t0 - t * L
            if t * L < t0:  # text t began in an earlier tile; ties keep its earlier token
                better = best > open_max
                best = tl.where(better, best, open_max)
                arg = tl.where(better, arg, open_arg)
            if t * L + L <= t0 + BLOCK_L:
                found = best > float("-inf")
                tl.store(row_max_ptr + out_rows + t * N, tl.where(found, _top_as_nan(best), 0.0), mask=row_in)
                jr = tl.where(found, arg, -1).to(row_arg_ptr.dtype.element_ty)
                tl.store(row_arg_ptr + out_rows + t * N, jr, mask=row_in)
            else:
                open_max, open_arg = best, arg


@triton.jit
def _max_similarity_forward_combine_kernel(
    img_w_ptr, txt_w_ptr, valid_ptr, row_max_ptr, part_max_ptr, part_arg_ptr,
    s_ptr, col_max_ptr, col_arg_ptr,
    Bt, N, L, R_txt,
    BLOCK_N: tl.constexpr, SLOTS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """For the pair (a, b): Eq. 5's maxima from the forward's per-block partials (in block order, so ties
    keep the first token), then S[a, b] of Eq. 4-5."""
    a = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    pair = a * Bt + b
    offs_l = tl.arange(0, BLOCK_L)
    valid = tl.load(valid_ptr + b * L + offs_l, mask=offs_l < L, other=0) != 0
    best = tl.full([BLOCK_L], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_L], tl.int32)
    for k in range((a * N) // BLOCK_N, ((a + 1) * N - 1) // BLOCK_N + 1):
        part = (k * SLOTS + a - (k * BLOCK_N) // N) * R_txt + b * L + offs_l
        blk_max = tl.load(part_max_ptr + part, mask=offs_l < L, other=float("-inf"))
        blk_arg = tl.load(part_arg_ptr + part, mask=offs_l < L, other=0)
        better = blk_max > best
        best = tl.where(better, blk_max, best)
        arg = tl.where(better, blk_arg, arg)
    col = tl.where(valid, _top_as_nan(best), 0.0)
    tl.store(col_max_ptr + pair * L + offs_l, col, mask=offs_l < L)
    tl.store(col_arg_ptr + pair * L + offs_l, tl.where(valid, arg, -1), mask=offs_l < L)
    w_t = tl.load(txt_w_ptr + b * L + offs_l, mask=valid, other=0.0).to(tl.float32)
    s_img = tl.zeros([BLOCK_R], tl.float32)
    for n0 in range(0, N, BLOCK_R):
        rows = n0 + tl.arange(0, BLOCK_R)
        w_i = tl.load(img_w_ptr + a * N + rows, mask=rows < N, other=0.0).to(tl.float32)
        s_img += w_i * tl.load(row_max_ptr + pair * N + rows, mask=rows < N, other=0.0)
    tl.store(s_ptr + pair, 0.5 * (tl.sum(s_img, axis=0) + tl.sum(w_t * col, axis=0)))


@triton.constexpr_function
def _log2(n: int) -> int:
    return n.bit_length() - 1


@triton.jit
def _sort(keys):
    """Ascending bitonic sort of a power-of-two number of int32 keys; each compare-exchange reads its partner
    with tl.gather (tl.sort's xor reductions run one element at a time in Triton's interpreter)."""
    offs = tl.arange(0, keys.shape[0])
    for stage in tl.static_range(1, _log2(keys.shape[0]) + 1):
        ascending = ((offs >> stage) & 1) == 0  # blocks of 2**stage alternate, the last one is whole
        for step in tl.static_range(stage):
            partner = tl.gather(keys, offs ^ (1 << (stage - 1 - step)), axis=0)
            keep_min = ((offs & (1 << (stage - 1 - step))) == 0) == ascending
            keys = tl.where(keep_min, tl.minimum(keys, partner), tl.maximum(keys, partner))
    return keys


@triton.jit
def _segment_sums(sorted_src, sorted_dest, first, R: tl.constexpr):
    """out[r] = sum of the rows of sorted_src (S, C) whose destination sorted_dest (S,), non-decreasing, is
    first + r, for r < R: a running sum down the rows, each segment's sum the difference of the running
    sums at its ends, taken on the smaller side (per destination, or per source when R > S, then gathered
    by destination). A fixed order of additions, no atomics; the rounding is relative to the running sum
    (at most the total of |src|)."""
    S: tl.constexpr = sorted_src.shape[0]
    C: tl.constexpr = sorted_src.shape[1]
    running = tl.cumsum(sorted_src, axis=0)
    local = sorted_dest - first
    counts = tl.histogram(local, R, mask=(local >= 0) & (local < R))  # segment lengths
    ends = tl.sum((local < 0).to(tl.int32), axis=0) + tl.cumsum(counts, axis=0)  # one past each segment
    starts = ends - counts
    if (
        R > S
    ):  # sources' segments: 0 <= start_k < end_k for the sources of a destination in [first, first + R)
        mine = tl.minimum(tl.maximum(local, 0), R - 1)
        start_k, end_k = tl.gather(starts, mine, axis=0), tl.gather(ends, mine, axis=0)
        upper = tl.gather(running, tl.broadcast_to(tl.maximum(end_k - 1, 0)[:, None], (S, C)), axis=0)
        lower = tl.gather(running, tl.broadcast_to(tl.maximum(start_k - 1, 0)[:, None], (S, C)), axis=0)
        totals = upper - tl.where((start_k > 0)[:, None], lower, 0.0)
        out = tl.gather(totals, tl.broadcast_to(tl.minimum(starts, S - 1)[:, None], (R, C)), axis=0)
    else:
        upper = tl.gather(running, tl.broadcast_to(tl.maximum(ends - 1, 0)[:, None], (R, C)), axis=0)
        lower = tl.gather(running, tl.broadcast_to(tl.maximum(starts - 1, 0)[:, None], (R, C)), axis=0)
        out = upper - tl.where((starts > 0)[:, None], lower, 0.0)
    return tl.where((counts > 0)[:, None], out, 0.0)


@triton.jit
def _max_similarity_backward_prep_kernel(
    img_w_ptr, txt_w_ptr, ds_ptr, row_max_ptr, row_arg_ptr, col_max_ptr, col_arg_ptr,
    d_img_w_ptr, img_proj_ptr, row_keys_ptr, col_keys_ptr,
    Bt, N, L,
    NORMALIZE: tl.constexpr, ROW_KEYS: tl.constexpr, COL_KEYS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, PICK_CHUNK: tl.constexpr,
):  # fmt: skip
    """For a block of image a's tokens and every text b: Eq. B1 for wI and the projection <vhat, d vhat> of
    Eq. B4 from the saved maxima; the block's tokens sorted by the text token they picked (keys
    jr * BLOCK_R + i - row0, jr = L for none) and, in the first block, the text tokens sorted by the image
    token that picked them (keys ic * BLOCK_L + j, N for none): the orders of the sums by destination.
    The projection's sum over the text tokens that picked each image token compares the block's rows with
    PICK_CHUNK text tokens at a time, in a fixed order (a gather into the larger block, as _segment_sums
    does, fails to compile for one channel in Triton 3.8)."""
    a = tl.program_id(0).to(tl.int64)
    row0 = tl.program_id(1) * BLOCK_R
    offs_r = tl.arange(0, BLOCK_R)
    rows = row0 + offs_r
    row_in = rows < N
    offs_l = tl.arange(0, BLOCK_L)
    w_i = tl.load(img_w_ptr + a * N + rows, mask=row_in, other=0.0).to(tl.float32)
    d_w = tl.zeros([BLOCK_R], tl.float32)
    proj = tl.zeros([BLOCK_R], tl.float32)
    for b in range(Bt):
        pair = a * Bt + b
        g = 0.5 * tl.load(ds_ptr + pair)
        row_max = tl.load(row_max_ptr + pair * N + rows, mask=row_in, other=0.0)
        d_w += g * row_max
        if NORMALIZE:  # wT[b,j] col_max[a,b,j] of the text tokens j that picked each image token
            to_rows = tl.zeros([BLOCK_R], tl.float32)
            for j0 in tl.static_range(0, BLOCK_L, PICK_CHUNK):
                j = j0 + tl.arange(0, PICK_CHUNK)
                ic_j = tl.load(col_arg_ptr + pair * L + j, mask=j < L, other=-1)
                picked = ic_j >= 0
                w_t = tl.load(txt_w_ptr + b * L + j, mask=picked, other=0.0).to(tl.float32)
                sources = w_t * tl.load(col_max_ptr + pair * L + j, mask=picked, other=0.0)
                to_rows += tl.sum(tl.where(ic_j[None, :] == rows[:, None], sources[None, :], 0.0), axis=1)
            proj += g * (w_i * row_max + to_rows)
        if ROW_KEYS:
            jr = tl.load(row_arg_ptr + pair * N + rows, mask=row_in, other=-1).to(tl.int32)
            keys = _sort(tl.where(jr >= 0, jr, L) * BLOCK_R + offs_r)
            keys = keys.to(row_keys_ptr.dtype.element_ty)
            tl.store(row_keys_ptr + pair * N + rows, keys, mask=row_in)  # the cut-off tail holds only "none"
        if COL_KEYS:  # kept by the first block
            ic = tl.load(col_arg_ptr + pair * L + offs_l, mask=offs_l < L, other=-1)
            col_keys = _sort(tl.where(ic >= 0, ic, N) * BLOCK_L + offs_l)  # distinct keys: a stable sort
            tl.store(col_keys_ptr + pair * L + offs_l, col_keys, mask=offs_l < tl.where(row0 == 0, L, 0))
    tl.store(d_img_w_ptr + a * N + rows, d_w, mask=row_in)
    if NORMALIZE:
        tl.store(img_proj_ptr + a * N + rows, proj, mask=row_in)


@triton.jit
def _max_similarity_backward_img_kernel(
    img_ptr, txt_ptr, img_w_ptr, txt_w_ptr, valid_ptr, img_r_ptr, txt_r_ptr, ds_ptr,
    row_arg_ptr, col_keys_ptr, img_proj_ptr, d_img_ptr,
    Bt, N, L, C, eps,
    NORMALIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Eq. B2 and B4: d img for a block of image a's tokens and a block of channels."""
    a = tl.program_id(0).to(tl.int64)
    row0 = tl.program_id(1) * BLOCK_R
    rows = row0 + tl.arange(0, BLOCK_R)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_in = rows < N
    offs_l = tl.arange(0, BLOCK_L)
    w_i = tl.load(img_w_ptr + a * N + rows, mask=row_in, other=0.0).to(tl.float32)
    d_hat = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for b in range(Bt):
        pair = a * Bt + b
        g = 0.5 * tl.load(ds_ptr + pair)
        valid = tl.load(valid_ptr + b * L + offs_l, mask=offs_l < L, other=0) != 0
        e = tl.load(
            txt_ptr + (b * L + offs_l)[:, None] * C + cols[None, :],
            mask=valid[:, None] & (cols < C)[None, :],
            other=0.0,
        ).to(tl.float32)
        if NORMALIZE:
            e *= tl.load(txt_r_ptr + b * L + offs_l, mask=valid, other=0.0)[:, None]
        # each image token's best text token
        jr = tl.load(row_arg_ptr + pair * N + rows, mask=row_in, other=-1).to(tl.int32)
        picked = tl.gather(e, tl.broadcast_to(tl.maximum(jr, 0)[:, None], (BLOCK_R, BLOCK_C)), axis=0)
        d_hat += tl.where(jr >= 0, g * w_i, 0.0)[:, None] * picked
        # the text tokens whose best image token it is, in the order of their image token
        keys = tl.load(col_keys_ptr + pair * L + offs_l, mask=offs_l < L, other=N * BLOCK_L)
        j = keys % BLOCK_L
        w_t = tl.load(txt_w_ptr + b * L + j, mask=keys < N * BLOCK_L, other=0.0).to(tl.float32)
        sources = tl.gather(e, tl.broadcast_to(j[:, None], (BLOCK_L, BLOCK_C)), axis=0) * (g * w_t)[:, None]
        d_hat += _segment_sums(sources, keys // BLOCK_L, row0, BLOCK_R)
    tile = (a * N + rows)[:, None] * C + cols[None, :]
    tile_mask = row_in[:, None] & (cols < C)[None, :]
    if NORMALIZE:
        x = tl.load(img_ptr + tile, mask=tile_mask, other=0.0).to(tl.float32)
        r = tl.load(img_r_ptr + a * N + rows, mask=row_in, other=0.0)
        proj = tl.where(r * eps < 1.0, r * tl.load(img_proj_ptr + a * N + rows, mask=row_in, other=0.0), 0.0)
        d_hat = r[:, None] * (d_hat - proj[:, None] * x)
    tl.store(d_img_ptr + tile, d_hat.to(d_img_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _max_similarity_backward_txt_kernel(
    img_ptr, img_w_ptr, txt_w_ptr, img_r_ptr, ds_ptr, row_keys_ptr, col_arg_ptr, d_txt_part_ptr,
    Bi, Bt, N, L, C, TEXTS, IMAGES_PER_PROGRAM,
    NORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Eq. B3 (d ehat) for a tile of TEXTS texts, a block of channels and a group of images: each block of
    image tokens is read once for all the texts of the tile."""
    tile = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    group = tl.program_id(2)
    offs_t = tl.arange(0, BLOCK_T)
    offs_l = tl.arange(0, BLOCK_L)
    n_texts = tl.minimum(TEXTS, Bt - tile * TEXTS)
    d_hat = tl.zeros([BLOCK_T, BLOCK_L, BLOCK_C], tl.float32)
    a_start = group * IMAGES_PER_PROGRAM
    img_ptr += a_start.to(tl.int64) * N * C  # 64-bit offset to the image, 32-bit within it
    for a in range(a_start, tl.minimum(a_start + IMAGES_PER_PROGRAM, Bi)):
        for n0 in range(0, N, BLOCK_R):
            rows = n0 + tl.arange(0, BLOCK_R)
            row_in = rows < N
            v = tl.load(
                img_ptr + rows[:, None] * C + cols[None, :],
                mask=row_in[:, None] & (cols < C)[None, :],
                other=0.0,
            ).to(tl.float32)
            if NORMALIZE:
                v *= tl.load(img_r_ptr + a * N + rows, mask=row_in, other=0.0)[:, None]
            v_w = v * tl.load(img_w_ptr + a * N + rows, mask=row_in, other=0.0).to(tl.float32)[:, None]
            for u in range(0, n_texts):
                b = tile * TEXTS + u
                pair = a * Bt + b
                g = 0.5 * tl.load(ds_ptr + pair)
                # the image tokens whose best token is j, in the order of j
                keys = tl.load(row_keys_ptr + pair * N + rows, mask=row_in, other=L * BLOCK_R).to(tl.int32)
                sources = tl.gather(v_w, tl.broadcast_to((keys % BLOCK_R)[:, None], (BLOCK_R, BLOCK_C)), 0)
                upd = _segment_sums(sources, keys // BLOCK_R, 0, BLOCK_L)
                # each text token's best image token, when it lies in this block
                ic = tl.load(col_arg_ptr + pair * L + offs_l, mask=offs_l < L, other=-1)
                here = (ic >= n0) & (ic < n0 + BLOCK_R)
                w_t = tl.load(txt_w_ptr + b * L + offs_l, mask=here, other=0.0).to(tl.float32)
                picked = tl.gather(
                    v, tl.broadcast_to(tl.where(here, ic - n0, 0)[:, None], (BLOCK_L, BLOCK_C)), 0
                )
                picked = tl.where(here[:, None], w_t[:, None] * picked, 0.0)  # not * 0: a NaN stays put
                upd = g * (upd + picked)
                d_hat += tl.where((offs_t == u)[:, None, None], upd[None, :, :], 0.0)
        img_ptr += N * C
    texts = (tile * TEXTS + offs_t).to(tl.int64)
    out = ((group * Bt + texts)[:, None, None] * L + offs_l[None, :, None]) * C + cols[None, None, :]
    mask = ((offs_t < n_texts)[:, None, None] & (offs_l < L)[None, :, None]) & (cols < C)[None, None, :]
    tl.store(d_txt_part_ptr + out, d_hat, mask=mask)


@triton.jit
def _max_similarity_backward_txt_finish_kernel(
    txt_ptr, img_w_ptr, txt_w_ptr, valid_ptr, txt_r_ptr, ds_ptr, row_max_ptr, row_keys_ptr, col_max_ptr,
    d_txt_part_ptr, d_txt_ptr, d_txt_w_ptr,
    Bi, Bt, N, L, C, GROUPS, eps,
    NORMALIZE: tl.constexpr, FEATURES: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """For text b: Eq. B1 for wT; with FEATURES, the image groups' partial d ehat summed in group order and
    Eq. B4 (its projection from the saved maxima, the image tokens that picked each text token in the order
    of the prep kernel's keys), giving d txt."""
    b = tl.program_id(0).to(tl.int64)
    offs_l = tl.arange(0, BLOCK_L)
    valid = tl.load(valid_ptr + b * L + offs_l, mask=offs_l < L, other=0) != 0
    w_t = tl.load(txt_w_ptr + b * L + offs_l, mask=valid, other=0.0).to(tl.float32)
    d_w = tl.zeros([BLOCK_L], tl.float32)
    proj = tl.zeros([BLOCK_L], tl.float32)
    for a in range(Bi):
        pair = a * Bt + b
        g = 0.5 * tl.load(ds_ptr + pair)
        col = tl.load(col_max_ptr + pair * L + offs_l, mask=offs_l < L, other=0.0)
        d_w += g * col
        if FEATURES and NORMALIZE:
            proj += g * w_t * col
            for n0 in range(0, N, BLOCK_R):
                rows = n0 + tl.arange(0, BLOCK_R)
                keys = tl.load(row_keys_ptr + pair * N + rows, mask=rows < N, other=L * BLOCK_R).to(tl.int32)
                i, picked = n0 + keys % BLOCK_R, keys < L * BLOCK_R
                sources = tl.load(row_max_ptr + pair * N + i, mask=picked, other=0.0)
                sources *= tl.load(img_w_ptr + a * N + i, mask=picked, other=0.0).to(tl.float32)
                proj += g * tl.sum(_segment_sums(sources[:, None], keys // BLOCK_R, 0, BLOCK_L), axis=1)
    tl.store(d_txt_w_ptr + b * L + offs_l, d_w, mask=offs_l < L)
    if FEATURES:
        r = tl.load(txt_r_ptr + b * L + offs_l, mask=valid, other=0.0) if NORMALIZE else 1.0
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            tile = (b * L + offs_l)[:, None] * C + cols[None, :]
            tile_mask = (offs_l < L)[:, None] & (cols < C)[None, :]
            d_hat = tl.zeros([BLOCK_L, BLOCK_C], tl.float32)
            for group in range(GROUPS):
                d_hat += tl.load(d_txt_part_ptr + group * Bt * L * C + tile, mask=tile_mask, other=0.0)
            if NORMALIZE:
                e = tl.load(txt_ptr + tile, mask=valid[:, None] & (cols < C)[None, :], other=0.0).to(
                    tl.float32
                )
                scaled = tl.where(r * eps < 1.0, r * proj, 0.0)
                d_hat = r[:, None] * (d_hat - scaled[:, None] * e)
            tl.store(d_txt_ptr + tile, d_hat.to(d_txt_ptr.dtype.element_ty), mask=tile_mask)


_runtime.check_flavour(_max_similarity_forward_kernel, __name__)


def _least_padded(rows: int, candidates: tuple[int, ...]) -> int:
    """The candidate tile height that pads ``rows`` least (the larger one on a tie)."""
    return min(sorted(candidates, reverse=True), key=lambda block: triton.cdiv(rows, block) * block)


class _Config(NamedTuple):
    """Launch parameters of one call (shapes and dtype only, so a call's kernels are fixed by its shapes)."""

    block_n: int  # forward: image tokens per program (flattened over images)
    block_l: int  # forward: text tokens per tile of the sweep (flattened over texts)
    block_c: int  # forward: channels per dot (all of them when the image block is resident)
    resident: bool
    slots: int  # images a forward block can meet
    precision: str
    num_warps: int
    bwd_l: int  # backward: tokens of one text, padded to a power of two
    bwd_r: int  # backward: image tokens per block
    bwd_c: int  # backward: channels per program
    texts: int  # backward: texts per tile of the text side
    bwd_warps: int  # backward's image- and text-side kernels

    @staticmethod
    def of(bi: int, bt: int, n: int, l: int, c: int, dtype: torch.dtype) -> _Config:
        """fp16/bf16: the image block stays on chip through the text sweep when it fits RESIDENT_BYTES (64
        tokens up to C = 512, 16 up to C = 2048), text tiles of 16 to 64 tokens sized to pad Bt*L least;
        exact products, fp32 accumulation. fp32 (3xTF32, about fp32 accuracy, whose split copies of a
        resident block would not fit) and wider C stream the image block in channel blocks (fp32 text tiles
        of at most 32 tokens, within the register file). The backward
        works on fp32 tiles of BWD_TILE_ELEMENTS: 16 channels by up to 256 image tokens, and as many texts
        per tile as fill it, 16 warps to a program (8 elements of a tile per thread, no spills)."""
        size = dtype.itemsize
        c_pad = max(16, triton.next_power_of_2(c))
        fitting = [block for block in (64, 32, 16) if size == 2 and block * c_pad * size <= RESIDENT_BYTES]
        resident = bool(fitting)
        block_n = min(fitting[0] if resident else 64, max(16, triton.next_power_of_2(bi * n)))
        tiles = [
            block
            for block in (64, 32, 16)[size // 4 :]
            if not resident or block * c_pad * size <= TEXT_TILE_BYTES
        ]
        block_l = _least_padded(bt * l, tuple(tiles) or (16,))
        bwd_l = max(16, triton.next_power_of_2(l))
        bwd_c = 16
        return _Config(
            block_n=block_n,
            block_l=block_l,
            block_c=c_pad if resident else 64 // (size // 2),
            resident=resident,
            slots=triton.cdiv(block_n - 1, n) + 1,
            precision="tf32x3" if dtype == torch.float32 else "tf32",
            num_warps=8,
            bwd_l=bwd_l,
            bwd_r=max(16, min(BWD_TILE_ELEMENTS // bwd_c, triton.next_power_of_2(n))),
            bwd_c=bwd_c,
            texts=max(1, min(bt, BWD_TILE_ELEMENTS // (bwd_l * bwd_c))),
            bwd_warps=16,
        )


def _token_index_dtype(l: int) -> torch.dtype:
    """Of jr and of the backward's sort keys jr * BLOCK_R + i (BLOCK_R <= 256): int16 while L < 127."""
    return torch.int16 if l < 127 else torch.int32


def _target_programs(device: torch.device) -> int:
    """Programs to aim for when splitting the text-side backward over image groups: a few per SM on a GPU;
    on CPU (the interpreter runs programs one by one) a small stand-in so that tests exercise the split."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 16


def _inv_norm(x: torch.Tensor) -> torch.Tensor:
    """1 / max(||x||, eps) over the last dimension, fp32, shape x.shape[:-1]."""
    r = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    _max_similarity_forward_norm_kernel[(triton.cdiv(r.numel(), ROWS_PER_PROGRAM),)](
        x, r, r.numel(), x.shape[-1], NORM_EPS, BLOCK_R=ROWS_PER_PROGRAM, BLOCK_C=NORM_BLOCK_C
    )
    return r


Tensor = torch.Tensor


@torch.library.custom_op("reclmis::max_similarity_forward", mutates_args=())
def max_similarity_forward(
    img: Tensor, txt: Tensor, img_weight: Tensor, txt_weight: Tensor, valid: Tensor, normalize: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """S (Bi, Bt) and what the backward needs: inverse norms (Bi, N), (Bt, L) (empty without normalize),
    row_max, row_arg (Bi, Bt, N) and col_max, col_arg (Bi, Bt, L), the indices int16 (row_arg while L < 127)
    or int32. Inputs contiguous; valid (Bt, L) uint8."""
    (bi, n, c), (bt, l, _) = img.shape, txt.shape
    cfg = _Config.of(bi, bt, n, l, c, img.dtype)
    f32 = {"dtype": torch.float32, "device": img.device}
    i32 = {"dtype": torch.int32, "device": img.device}
    img_r = torch.empty(bi, n, **f32) if normalize else torch.empty(0, **f32)
    txt_r = _inv_norm(txt) if normalize else torch.empty(0, **f32)
    row_max = torch.empty(bi, bt, n, **f32)
    row_arg = torch.empty(bi, bt, n, dtype=_token_index_dtype(l), device=img.device)
    col_max, col_arg = torch.empty(bi, bt, l, **f32), torch.empty(bi, bt, l, **i32)
    blocks = triton.cdiv(bi * n, cfg.block_n)
    part_max, part_arg = (
        torch.empty(blocks, cfg.slots, bt * l, **f32),
        torch.empty(blocks, cfg.slots, bt * l, **i32),
    )
    _max_similarity_forward_kernel[(blocks,)](
        img, txt, valid, img_r, txt_r, row_max, row_arg, part_max, part_arg,
        bt, n, l, c, bi * n, bt * l, NORM_EPS,
        NORMALIZE=normalize, RESIDENT=cfg.resident, PRECISION=cfg.precision,
        BLOCK_N=cfg.block_n, BLOCK_L=cfg.block_l, BLOCK_C=cfg.block_c, SLOTS=cfg.slots,
        num_warps=cfg.num_warps,
    )  # fmt: skip
    s = torch.empty(bi, bt, **f32)
    _max_similarity_forward_combine_kernel[(bi, bt)](
        img_weight, txt_weight, valid, row_max, part_max, part_arg, s, col_max, col_arg,
        bt, n, l, bt * l,
        BLOCK_N=cfg.block_n, SLOTS=cfg.slots, BLOCK_L=cfg.bwd_l, BLOCK_R=cfg.bwd_r, num_warps=4,
    )  # fmt: skip
    return s, img_r, txt_r, row_max, row_arg, col_max, col_arg


@max_similarity_forward.register_fake
def _(img, txt, img_weight, txt_weight, valid, normalize):
    (bi, n, _), (bt, l, _) = img.shape, txt.shape
    f32, i32 = {"dtype": torch.float32}, {"dtype": torch.int32}
    norm_shapes = ((bi, n), (bt, l)) if normalize else ((0,), (0,))
    norms = tuple(img.new_empty(shape, **f32) for shape in norm_shapes)
    return (
        img.new_empty(bi, bt, **f32),
        *norms,
        img.new_empty(bi, bt, n, **f32),
        img.new_empty(bi, bt, n, dtype=_token_index_dtype(l)),
        img.new_empty(bi, bt, l, **f32),
        img.new_empty(bi, bt, l, **i32),
    )


@torch.library.custom_op("reclmis::max_similarity_backward", mutates_args=())
def max_similarity_backward(
    d_s: Tensor, img: Tensor, txt: Tensor, img_weight: Tensor, txt_weight: Tensor, valid: Tensor,
    img_r: Tensor, txt_r: Tensor, row_max: Tensor, row_arg: Tensor, col_max: Tensor, col_arg: Tensor,
    normalize: bool, needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients w.r.t. img, txt, img_weight, txt_weight (an empty tensor where ``needs`` is False)."""
    (bi, n, c), (bt, l, _) = img.shape, txt.shape
    cfg = _Config.of(bi, bt, n, l, c, img.dtype)
    d_s = d_s.float().contiguous()
    f32 = {"dtype": torch.float32, "device": img.device}
    i32 = {"dtype": torch.int32, "device": img.device}
    none = img.new_empty(0)
    d_img, d_txt, d_img_w, d_txt_w = none, none, none, none
    row_keys = col_keys = none  # the orders of the sums by destination, for the text and image sides
    blocks = {"BLOCK_R": cfg.bwd_r, "BLOCK_L": cfg.bwd_l, "num_warps": cfg.num_warps}
    features = {**blocks, "num_warps": cfg.bwd_warps}
    row_blocks, c_blocks = triton.cdiv(n, cfg.bwd_r), triton.cdiv(c, cfg.bwd_c)
    if needs[0] or needs[1] or needs[2]:
        d_img_w = torch.empty(bi, n, **f32)
        img_proj = torch.empty(bi, n, **f32) if normalize and needs[0] else torch.empty(0, **f32)
        if needs[1]:
            row_keys = torch.empty(bi, bt, n, dtype=row_arg.dtype, device=img.device)
        if needs[0]:
            col_keys = torch.empty(bi, bt, l, **i32)
        _max_similarity_backward_prep_kernel[(bi, row_blocks)](
            img_weight, txt_weight, d_s, row_max, row_arg, col_max, col_arg,
            d_img_w, img_proj, row_keys, col_keys,
            bt, n, l, NORMALIZE=normalize and needs[0], ROW_KEYS=needs[1], COL_KEYS=needs[0],
            PICK_CHUNK=PICK_CHUNK, **blocks,
        )  # fmt: skip
        d_img_w = d_img_w.to(img_weight.dtype) if needs[2] else d_img_w
    if needs[0]:
        d_img = torch.empty_like(img)
        _max_similarity_backward_img_kernel[(bi, row_blocks, c_blocks)](
            img, txt, img_weight, txt_weight, valid, img_r, txt_r, d_s, row_arg, col_keys, img_proj, d_img,
            bt, n, l, c, NORM_EPS, NORMALIZE=normalize, BLOCK_C=cfg.bwd_c, **features,
        )  # fmt: skip
    if needs[1] or needs[3]:
        tiles = triton.cdiv(bt, cfg.texts)
        groups = max(1, min(bi, _target_programs(img.device) // (tiles * c_blocks))) if needs[1] else 1
        images_per_program = triton.cdiv(bi, groups)
        groups = triton.cdiv(bi, images_per_program)
        d_txt_part = torch.empty(groups, bt, l, c, **f32) if needs[1] else torch.empty(0, **f32)
        if needs[1]:
            _max_similarity_backward_txt_kernel[(tiles, c_blocks, groups)](
                img, img_weight, txt_weight, img_r, d_s, row_keys, col_arg, d_txt_part,
                bi, bt, n, l, c, cfg.texts, images_per_program,
                NORMALIZE=normalize, BLOCK_T=triton.next_power_of_2(cfg.texts), BLOCK_C=cfg.bwd_c, **features,
            )  # fmt: skip
        d_txt = torch.empty_like(txt) if needs[1] else none
        d_txt_w = torch.empty(bt, l, **f32)
        _max_similarity_backward_txt_finish_kernel[(bt,)](
            txt, img_weight, txt_weight, valid, txt_r, d_s, row_max, row_keys, col_max,
            d_txt_part, d_txt, d_txt_w,
            bi, bt, n, l, c, groups, NORM_EPS,
            NORMALIZE=normalize, FEATURES=needs[1], BLOCK_C=cfg.bwd_c, **blocks,
        )  # fmt: skip
        d_txt_w = d_txt_w.to(txt_weight.dtype) if needs[3] else d_txt_w
    grads = (d_img, d_txt, d_img_w, d_txt_w)
    return tuple(g if need else g.new_empty(0) for g, need in zip(grads, needs, strict=True))  # no aliases


@max_similarity_backward.register_fake
def _(
    d_s,
    img,
    txt,
    img_weight,
    txt_weight,
    valid,
    img_r,
    txt_r,
    row_max,
    row_arg,
    col_max,
    col_arg,
    normalize,
    needs,
):
    inputs = (img, txt, img_weight, txt_weight)
    return tuple(
        torch.empty_like(x) if need else x.new_empty(0) for x, need in zip(inputs, needs, strict=True)
    )


def _setup_context(ctx, inputs, output) -> None:
    img, txt, img_weight, txt_weight, valid, normalize = inputs
    ctx.save_for_backward(img, txt, img_weight, txt_weight, valid, *output[1:])
    ctx.normalize = normalize
    ctx.mark_non_differentiable(*output[1:])


def _autograd_backward(ctx, d_s, *_):
    needs = list(ctx.needs_input_grad[:4])
    grads = max_similarity_backward(d_s, *ctx.saved_tensors, ctx.normalize, needs)
    return *(g if need else None for g, need in zip(grads, needs, strict=True)), None, None


max_similarity_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


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
    _runtime.check_device(img.device, "max_similarity")
    if txt_mask is None:
        txt_mask = torch.ones(txt.shape[:2], dtype=torch.bool, device=txt.device)
    valid = txt_mask.contiguous().view(torch.uint8)
    inputs = (img.contiguous(), txt.contiguous(), img_weight.contiguous(), txt_weight.contiguous())
    return max_similarity_forward(*inputs, valid, normalize)[0]
