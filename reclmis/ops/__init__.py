"""The three custom ops of RecLMIS (DESIGN section 3): public API, input checks and dispatch.

Each op has a plain PyTorch ``*_reference`` that reads like its equation and serves as the oracle for the
fused backends (Triton kernels in ``reclmis.kernels``, the C++/CUDA extension ``reclmis._C``).
"""

from reclmis.ops.conditioned_attention import conditioned_attention, conditioned_attention_reference
from reclmis.ops.max_similarity import max_similarity, max_similarity_reference
from reclmis.ops.weighted_mask import weighted_mask, weighted_mask_reference

__all__ = [
    "conditioned_attention",
    "conditioned_attention_reference",
    "max_similarity",
    "max_similarity_reference",
    "weighted_mask",
    "weighted_mask_reference",
]
