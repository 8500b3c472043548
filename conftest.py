"""Test session set-up.

Without a CUDA device the Triton kernels run under Triton's CPU interpreter (DESIGN section 4). Triton reads
TRITON_INTERPRET when it is first imported, and several libraries import it, so the flag is set here, before
any test module is collected. On a CUDA machine the kernels compile as usual (`pytest -m gpu`).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
