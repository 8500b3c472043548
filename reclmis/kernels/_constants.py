"""Constants of the ops' definitions, shared by the kernels and the PyTorch references in ``reclmis.ops``
(importable without triton)."""

# conditioned_attention, mode "reweight" (the official code): softmax(logits) * (cond + eps), renormalised
REWEIGHT_EPS = 1e-10
# max_similarity's cosine: x / max(||x||, eps), F.normalize's default
NORM_EPS = 1e-12
