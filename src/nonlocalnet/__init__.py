"""nonlocalnet: nonlocal neural networks in PyTorch, every block as a graph filter (seed 003).

>>> import torch, nonlocalnet
>>> block = nonlocalnet.build_block("snl", 64)
>>> block(torch.randn(2, 64, 16, 16)).shape
torch.Size([2, 64, 16, 16])
"""

from . import compat, reference
from .blocks import Affinity, NonlocalBlock, NonlocalUnit
from .presets import PRESETS, build_block, list_blocks

__version__ = "0.1.0"
__all__ = ["build_block", "list_blocks", "PRESETS", "NonlocalBlock", "NonlocalUnit", "Affinity", "compat", "reference",
           "__version__"]
