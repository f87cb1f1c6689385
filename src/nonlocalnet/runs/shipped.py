"""The configs shipped inside the package, by paper: ``nonlocalnet configs`` lists them, ``--copy`` writes one out.

The files live in ``nonlocalnet/configs/<paper>/`` (:data:`~nonlocalnet.runs.config.SHIPPED`; the repository's
``configs/`` is a link to it) and are loaded by name (:func:`~nonlocalnet.runs.config.resolve_config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import SHIPPED, ConfigError, PaperResult, load_raw, resolve_config, shipped_names

__all__ = ["PAPERS", "ShippedConfig", "copy_config", "format_configs", "shipped_configs"]

PAPERS = {
    "tao2018": 'Y. Tao, Q. Sun, Q. Du, W. Liu, "Nonlocal Neural Networks, Nonlocal Diffusion and Nonlocal Modeling", '
               "NeurIPS 2018 (arXiv:1806.00681)",
    "snl2020": 'L. Zhu, Q. She, L. Zhang, P. Guo, "A Spectral Nonlocal Block for Neural Networks", ICLR 2020 '
               "submission (OpenReview rkgb9kSKwS)",
    "unified2021": 'L. Zhu, Q. She, D. Li, Y. Lu, X. Kang, J. Hu, C. Wang, "Unifying Nonlocal Blocks for Neural '
                   'Networks", ICCV 2021 (arXiv:2108.02451)',
    "demo": 'the bundled "same glyph?" task (docs/data.md): `nonlocalnet demo`',
    "claims": "every block on a smaller version of the bundled task, over seeds (docs/results.md)",
}
"""The folder of each paper's configs -> the paper (docs/configs.md maps the configs to its rows)."""


@dataclass(frozen=True)
class ShippedConfig:
    name: str
    """``<paper folder>/<file stem>``, what ``nonlocalnet train NAME`` takes."""
    path: Path
    description: str | None
    paper: PaperResult | None
    """The paper's table row and number, where the config reproduces one."""

    @property
    def folder(self) -> str:
        return self.name.split("/", 1)[0]


def _paper(raw: dict) -> PaperResult | None:
    p = raw.get("paper")
    return PaperResult(**p) if isinstance(p, dict) else None


def shipped_configs() -> list[ShippedConfig]:
    """Every shipped config with its description and paper row (``base:`` chains resolved), papers in
    :data:`PAPERS` order."""
    order = {k: i for i, k in enumerate(PAPERS)}
    out = []
    for name in shipped_names():
        path = SHIPPED / f"{name}.yaml"
        raw = load_raw(path)
        out.append(ShippedConfig(name, path, raw.get("description"), _paper(raw)))
    return sorted(out, key=lambda c: (order.get(c.folder, len(order)), c.name))


def format_configs(configs: list[ShippedConfig] | None = None) -> str:
    """The listing ``nonlocalnet configs`` prints: a heading per paper, one line per config, and below it the
    paper's row and number where it has one."""
    configs = shipped_configs() if configs is None else configs
    width = max(len(c.name) for c in configs)
    lines, folder = [], None
    for c in configs:
        if c.folder != folder:
            folder = c.folder
            lines += ["" if lines else None, f"{folder}: {PAPERS.get(folder, '')}".rstrip(": ")]
        lines.append(f"  {c.name:{width}}  {c.description or ''}".rstrip())
        if c.paper is not None:
            lines.append(f"  {'':{width}}  paper: {c.paper.source}: {c.paper.metric} {c.paper.value:g} %")
    return "\n".join(line for line in lines if line is not None) + "\n"


def copy_config(name: str, directory: str | Path) -> Path:
    """Write the shipped config ``name`` to ``directory/<stem>.yaml`` to edit; never overwrites. A config with a
    ``base:`` chain is written with the chain merged in (the bases stay in the package), after the file's own
    comment header."""
    if name not in shipped_names() and name.removesuffix(".yaml") not in shipped_names():
        resolve_config(name)  # raises with the closest names when it is neither
        raise ConfigError(f"configs --copy: {name!r} is a file, not a shipped config (`nonlocalnet configs` "
                          "lists them)")
    src = SHIPPED / f"{name.removesuffix('.yaml')}.yaml"
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"configs --copy: {directory} is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / src.name
    text = src.read_text()
    raw = yaml.safe_load(text) or {}
    if "base" in raw:
        header = []
        for line in text.splitlines():
            if not line.startswith("#"):
                break
            header.append(line)
        header.append(f"# Copied by `nonlocalnet configs --copy {src.relative_to(SHIPPED).with_suffix('')}`, "
                      "its base: chain merged in.")
        text = "\n".join(header) + "\n" + yaml.safe_dump(load_raw(src), sort_keys=False, default_flow_style=False,
                                                        width=1000)
    try:
        with open(dest, "x") as f:
            f.write(text)
    except FileExistsError:
        raise ConfigError(f"configs --copy: {dest} exists; not overwritten (remove it or pick another "
                          "directory)") from None
    return dest
