"""A new kernel and a new learnable filter, registered from outside the library (docs/design.md, "Where to add")."""
import math

import torch

import nonlocalnet as nl
from nonlocalnet.registry import int_at_least


class Linear(nl.Kernel):  # Katharopoulos et al., "Transformers are RNNs", ICML 2020: φ(x) = elu(x) + 1
    def transform(self, q, k):  # φ on queries and keys: the product factorizes (linear time, no N x N)
        return torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    def literal(self, q, k, scale=1.0):  # M = φ(Q) φ(K)ᵀ formed, for the dense reference
        return (torch.nn.functional.elu(q) + 1) @ (torch.nn.functional.elu(k) + 1).transpose(1, 2)

class ChebNetII(nl.ResponsePolynomial):  # He, Wei, Wen, NeurIPS 2022: learned values at K+1 Chebyshev nodes
    options = {"order": nl.Option(3, "degree K (K + 1 learned values)", int_at_least(1))}
    def __init__(self, order):
        super().__init__("chebnet2", degree=order)
        self.gamma = torch.nn.Parameter(torch.ones(order + 1))
    def response(self, lam):  # (1, len(λ)): the Chebyshev interpolant of relu(γ_j) at x_j = cos((j + ½)π/(K + 1))
        n = self.degree + 1
        x = torch.cos((torch.arange(n, dtype=lam.dtype) + 0.5) * math.pi / n)
        t_lam, t_x = [torch.ones_like(lam), lam], [torch.ones_like(x), x]
        for _ in range(n - 2):
            t_lam, t_x = t_lam + [2 * lam * t_lam[-1] - t_lam[-2]], t_x + [2 * x * t_x[-1] - t_x[-2]]
        c = 2 / n * torch.stack(t_x[:n]) @ self.gamma.relu().to(lam.dtype)  # the interpolant's T_k coefficients
        return (torch.cat([c[:1] / 2, c[1:]]) @ torch.stack(t_lam[:n]))[None]

nl.register_kernel(Linear("linear", "φ(q_i)·φ(k_j), φ = elu + 1", pretransform="custom", factorizable=True,
                          natural_normalization="row"))
nl.register_filter("chebnet2", ChebNetII)
nl.register_block(nl.Preset("linear", "Katharopoulos et al., ICML 2020, with ChebNetII's filter (NeurIPS 2022)",
                            dict(kernel="linear", normalization="row", filter="chebnet2", out_norm="none")))
