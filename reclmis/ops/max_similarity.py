"""Bidirectional weighted max-similarity (paper Eq. 4-5; DESIGN section 3.2).

For image a with tokens v_ai (weights W_poi[a, i]) and text b with valid tokens e_bj (weights W_woi[b, j]):

    S[a, b] = 0.5 * ( sum_i W_poi[a, i] * max_j cos(v_ai, e_bj)
                    + sum_j W_woi[b, j] * max_i cos(v_ai, e_bj) )

Padded tokens take part in no max and no sum. A text with no valid token contributes 0 to both terms.
With normalize=False the cosine is replaced by the raw dot product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reclmis.kernels._constants import NORM_EPS
from reclmis.ops._checks import check_dim, check_same_device, check_tensor, resolve_triton_backend


def max_similarity_reference(
    img: torch.Tensor,
    txt: torch.Tensor,
    img_weight: torch.Tensor,
    txt_weight: torch.Tensor,
    txt_mask: torch.Tensor | None = None,
    *,
    normalize: bool = True,
) -> torch.Tensor:
    """Plain PyTorch oracle: materialises the (Bi, Bt, N, L) similarity tensor, in fp32. A NaN propagates
    to every maximum and sum it takes part in (torch.amax's rule); padded tokens take part in none."""
    if txt_mask is None:
        txt_mask = torch.ones(txt.shape[:2], dtype=torch.bool, device=txt.device)
    img, txt = img.float(), txt.float().masked_fill(~txt_mask[..., None], 0.0)
    if normalize:
        img, txt = F.normalize(img, dim=-1, eps=NORM_EPS), F.normalize(txt, dim=-1, eps=NORM_EPS)
    sim = torch.einsum("anc,blc->abnl", img, txt)  # (Bi, Bt, N, L)
    valid = txt_mask[None, :, None, :]  # (1, Bt, 1, L)
    img_to_txt = sim.masked_fill(~valid, float("-inf")).amax(dim=-1)  # (Bi, Bt, N): max over tokens
    img_to_txt = img_to_txt.masked_fill(~txt_mask.any(-1)[None, :, None], 0.0)
    txt_to_img = sim.amax(dim=-2).masked_fill(~txt_mask[None], 0.0)  # (Bi, Bt, L): max over patches
    s_img = torch.einsum("abn,an->ab", img_to_txt, img_weight.float())
    s_txt = torch.einsum("abl,bl->ab", txt_to_img, txt_weight.float().masked_fill(~txt_mask, 0.0))
    return 0.5 * (s_img + s_txt)


def _validate(img, txt, img_weight, txt_weight, txt_mask) -> None:
    check_tensor("img", img, 3)
    check_tensor("txt", txt, 3)
    check_tensor("img_weight", img_weight, 2)
    check_tensor("txt_weight", txt_weight, 2)
    bi, n, c = img.shape
    bt, l, _ = txt.shape
    check_dim("txt", txt, 2, c, "channels of img")
    if txt.dtype != img.dtype:
        raise TypeError(f"txt has dtype {txt.dtype} but img has {img.dtype}")
    check_dim("img_weight", img_weight, 0, bi, "batch of img")
    check_dim("img_weight", img_weight, 1, n, "tokens of img")
    check_dim("txt_weight", txt_weight, 0, bt, "batch of txt")
    check_dim("txt_weight", txt_weight, 1, l, "tokens of txt")
    if min(bi, n, bt, l, c) < 1:
        raise ValueError(f"img {tuple(img.shape)} and txt {tuple(txt.shape)} must have no empty dimension")
    if txt_mask is not None:
        check_tensor("txt_mask", txt_mask, 2, (torch.bool,))
        check_dim("txt_mask", txt_mask, 0, bt, "batch of txt")
        check_dim("txt_mask", txt_mask, 1, l, "tokens of txt")
    check_same_device("img", img, txt=txt, img_weight=img_weight, txt_weight=txt_weight, txt_mask=txt_mask)


def max_similarity(
    img: torch.Tensor,
    txt: torch.Tensor,
    img_weight: torch.Tensor,
    txt_weight: torch.Tensor,
    txt_mask: torch.Tensor | None = None,
    *,
    normalize: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """S (Bi, Bt) in fp32 for img (Bi,N,C), txt (Bt,L,C), img_weight (Bi,N), txt_weight (Bt,L).

    txt_mask (Bt,L) bool marks valid tokens (True). Differentiable in img, txt and both weights; the
    gradient of a max flows to its argmax. ``backend``: "auto" (Triton on CUDA, reference elsewhere),
    "reference" or "triton" (never allocates Bi*Bt*N*L elements; on CPU tensors it runs in Triton's
    interpreter, TRITON_INTERPRET=1, which has no bfloat16: bf16 img and txt are a TypeError there).
    """
    _validate(img, txt, img_weight, txt_weight, txt_mask)
    if resolve_triton_backend(backend, "max_similarity", "img", img) == "reference":
        return max_similarity_reference(img, txt, img_weight, txt_weight, txt_mask, normalize=normalize)
    from reclmis.kernels.max_similarity import max_similarity_triton

    return max_similarity_triton(img, txt, img_weight, txt_weight, txt_mask, normalize=normalize)
