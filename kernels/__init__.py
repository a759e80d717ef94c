"""Triton kernels of deltahub, each beside a plain-torch reference with the same signature.

Shipped inside the distribution as ``deltahub.kernels`` (the top-level name ``kernels`` belongs to
Hugging Face's kernel loader on PyPI). This package imports nothing else of deltahub. The kernels
themselves (sign_matmul, its multi-tenant variant, apply_delta) arrive with the serving work.
"""
