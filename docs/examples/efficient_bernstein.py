"""A new kernel and a new learnable filter, registered from outside the library (docs/design.md, "Where to add")."""
import math

import torch

import nonlocalnet as nl
from nonlocalnet.kernels import softmax_tokens
from nonlocalnet.registry import int_at_least


class Efficient(nl.Kernel):  # Shen et al., "Efficient Attention: Attention with Linear Complexities", WACV 2021
    def transform(self, q, k):  # queries: softmax over channels, keys: softmax over positions (linear time)
        return softmax_tokens(q, -1), softmax_tokens(k, 1)
    def literal(self, q, k, scale=1.0):  # M = ρ_q(Q) ρ_k(K)ᵀ formed, for the dense reference
        return torch.softmax(q, -1) @ torch.softmax(k, 1).transpose(1, 2)

class Bernstein(nl.ResponsePolynomial):  # He et al., "BernNet", NeurIPS 2021: Σ_k relu(θ_k) b_k(L/2), L = I - A
    options = {"order": nl.Option(3, "degree K of the Bernstein basis", int_at_least(1))}
    def __init__(self, order):
        super().__init__("bernstein", degree=order)
        self.theta = torch.nn.Parameter(torch.ones(order + 1))
    def response(self, lam):  # (1, len(λ)): Σ_k relu(θ_k) C(K, k) x^k (1 - x)^(K-k), x = (1 - λ)/2
        n, x, k = self.degree, (1 - lam) / 2, torch.arange(self.degree + 1, dtype=lam.dtype)[:, None]
        basis = torch.tensor([math.comb(n, j) for j in range(n + 1)], dtype=lam.dtype)[:, None] * x**k * (1 - x)**(n-k)
        return (self.theta.relu().to(lam.dtype) @ basis)[None]

nl.register_kernel(Efficient("efficient", "softmax_C(q)·softmax_N(k)", pretransform="custom", factorizable=True,
                             natural_normalization="none", unit_rows=True))
nl.register_filter("bernstein", Bernstein)
nl.register_block(nl.Preset("efficient", "Shen et al., WACV 2021, with BernNet's filter (He et al., NeurIPS 2021)",
                            dict(kernel="efficient", normalization="none", filter="bernstein", out_norm="none")))
