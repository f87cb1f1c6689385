"""nonlocalnet: nonlocal neural networks in PyTorch, every block as a graph filter.

The graph-filter view is that of L. Zhu et al., "Unifying Nonlocal Blocks for Neural Networks", ICCV 2021
(arXiv:2108.02451). The blocks come from X. Wang, R. Girshick, A. Gupta, K. He, "Non-local Neural Networks",
CVPR 2018 (arXiv:1711.07971); Y. Tao, Q. Sun, Q. Du, W. Liu, "Nonlocal Neural Networks, Nonlocal Diffusion
and Nonlocal Modeling", NeurIPS 2018 (arXiv:1806.00681); L. Zhu, Q. She, L. Zhang, P. Guo, "A Spectral
Nonlocal Block for Neural Networks", ICLR 2020 submission (OpenReview rkgb9kSKwS); and Zhu et al. 2021 (ICCV).
``nonlocalnet.list_blocks()`` and ``nonlocalnet.PRESETS[name].reference`` give the paper of each block.
New blocks are designed from registered parts — ``register_kernel``, ``register_graph``, ``register_filter``,
``register_block`` (docs/design.md, "Where to add"; docs/examples/) — and checked with ``nonlocalnet.testing``.

>>> import torch, nonlocalnet
>>> block = nonlocalnet.build_block("snl", 64)
>>> block(torch.randn(2, 64, 16, 16)).shape
torch.Size([2, 64, 16, 16])
"""

from . import compat, reference
from .blocks import Affinity, NonlocalBlock, NonlocalUnit
from .filters import FILTERS, Filter, Polynomial, ResponsePolynomial, register_filter
from .kernels import GRAPH_MODES, KERNELS, GraphMode, Kernel, register_graph, register_kernel
from .presets import PRESETS, Preset, block_options, build_block, list_blocks, register_block
from .registry import Option

__version__ = "0.1.0"
__all__ = ["build_block", "list_blocks", "block_options", "PRESETS", "Preset", "register_block", "KERNELS", "Kernel",
           "register_kernel", "GRAPH_MODES", "GraphMode", "register_graph", "FILTERS", "Filter", "Polynomial",
           "ResponsePolynomial", "register_filter", "Option", "NonlocalBlock", "NonlocalUnit", "Affinity", "compat",
           "reference", "__version__"]
