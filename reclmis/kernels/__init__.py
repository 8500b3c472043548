"""Triton kernels of RecLMIS, installed as ``reclmis.kernels``.

Each module holds the forward/backward kernels of one op and the ``torch.autograd.Function`` that ties
them together; the public entry points with input checks live in ``reclmis.ops``.
"""
