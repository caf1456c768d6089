"""Fused kernels: per-token log-prob and entropy over the vocabulary, forward and backward (METHOD.md §5)."""

from eagrl.kernels.ops import check_ids, resolve_backend, token_logp_entropy, token_logp_entropy_on, triton_installed, triton_runs_on
from eagrl.kernels.reference import token_logp_entropy_backward_reference, token_logp_entropy_reference

__all__ = [
    "check_ids",
    "resolve_backend",
    "token_logp_entropy",
    "token_logp_entropy_on",
    "token_logp_entropy_backward_reference",
    "token_logp_entropy_reference",
    "triton_installed",
    "triton_runs_on",
]
