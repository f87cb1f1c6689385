"""Analyses of trained nonlocal blocks (``nonlocalnet analyze``; see ``docs/analysis.md``).

- :func:`run_spectrum` — eigenvalues of ``sym(W_t W_g)`` per block and over epochs (Tao et al. 2018, §3.1);
- :func:`run_affinity` — histograms of ``A, A², A³, A⁴`` and their distance to ``A`` (the ICLR 2020 spectral
  nonlocal submission Fig. 2);
- :func:`run_attention` — attention rows of ``A`` over the image, feature maps (Zhu et al. 2021 Fig. 3);
- :func:`run_filter` — the learned graph filter's gain vs the eigenvalues of ``A``;
- :func:`run_dynamics` — ``‖x_t‖/‖x_0‖`` when iterating a trained block (Tao et al. 2018 diffusion view);
- :func:`run_cost` — parameters, FLOPs, peak memory (Zhu et al. 2021 Table 6);
- :func:`write_report` — all of them in one self-contained HTML page.

Each ``run_*`` takes a :class:`Loaded` run (:func:`load_run`) or a model given in Python
(:meth:`Loaded.from_model`; the data-based ones then take ``batch=Batch.from_tensor(x)`` when there is no
config) and an output directory, writes PNGs and a JSON, and returns the JSON data.
"""

from nonlocalnet.runs import Loaded, load_config_only, load_run

from .affinity_powers import run_affinity
from .attention import run_attention
from .capture import Batch, load_batch
from .cost import run_cost
from .dynamics import run_dynamics
from .errors import AnalysisError, DataError, NoBlockError
from .graph_filter import run_filter
from .report import write_report
from .spectrum import run_spectrum

__all__ = [
    "AnalysisError",
    "Batch",
    "DataError",
    "Loaded",
    "NoBlockError",
    "load_batch",
    "load_config_only",
    "load_run",
    "run_affinity",
    "run_attention",
    "run_cost",
    "run_dynamics",
    "run_filter",
    "run_spectrum",
    "write_report",
]
