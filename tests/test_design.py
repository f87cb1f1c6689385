"""Designing a block from registered parts: a user's kernel and filter (docs/examples/), the registries, the
capability declarations of the structured paths, module conventions, and checkpoints written before the parts."""

from __future__ import annotations

import dataclasses
import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from _util import assert_structured_path
from safetensors import safe_open
from torch.testing import assert_close

import nonlocalnet
from nonlocalnet import reference as ref
from nonlocalnet.blocks import STRUCTURED_PATHS, NonlocalUnit, UnitConfig
from nonlocalnet.filters import FILTERS
from nonlocalnet.kernels import KERNELS
from nonlocalnet.presets import PRESETS
from nonlocalnet.testing import check_block, largest_tensor, randomize

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "linear_chebnet2.py"


@pytest.fixture
def user_parts():
    """The example's kernel, filter and block registered for one test, then removed (the registries are global)."""
    runpy.run_path(str(EXAMPLE))
    yield
    PRESETS.unregister("linear")
    FILTERS.unregister("chebnet2")
    KERNELS.unregister("linear")


def chebnet2(gamma: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """ChebNetII's response written out with numpy: the degree-K polynomial through (x_j, relu(γ_j)) at the K+1
    Chebyshev nodes (numpy's own Chebyshev interpolation on those nodes)."""
    n = len(gamma)
    nodes = np.cos((np.arange(n) + 0.5) * np.pi / n)
    coef = np.polynomial.chebyshev.chebfit(nodes, np.maximum(gamma, 0.0), n - 1)
    return np.polynomial.chebyshev.chebval(lam, coef)


def test_example_is_a_short_user_file():
    """The kernel, the filter and the block are defined and registered in <= 25 lines (imports, the docstring and
    blank lines aside), importing nothing but torch and nonlocalnet."""
    lines = [ln for ln in EXAMPLE.read_text().splitlines()[1:] if ln.strip() and not ln.startswith(("import", "from"))]
    assert len(lines) <= 25
    imports = {ln.split()[1].split(".")[0] for ln in EXAMPLE.read_text().splitlines() if ln.startswith(("import",
                                                                                                        "from"))}
    assert imports == {"math", "torch", "nonlocalnet"}


def test_example_parts_by_name(user_parts):
    assert "linear" in nonlocalnet.list_blocks() and "linear" in KERNELS and "chebnet2" in FILTERS
    block = nonlocalnet.build_block("linear", 8, order=4)
    assert block.edges.kernel == "linear" and block.units[0].filter.degree == 4
    assert [n for n, _ in block.named_parameters()] == [
        "edges.theta.weight", "edges.theta.bias", "edges.phi.weight", "edges.phi.bias", "units.0.spectral.gamma",
        "units.0.g.weight", "units.0.g.bias", "units.0.w.0.weight", "units.0.w.0.bias"]
    # the parts also go into the library's own blocks
    assert nonlocalnet.build_block("snl", 8, filter="chebnet2").units[0].filter.name == "chebnet2"
    with pytest.raises(ValueError, match="order: expected"):
        nonlocalnet.build_block("linear", 8, order=-1)


def test_example_equals_its_dense_form(user_parts):
    report = check_block("linear")
    assert report["2d"] < 1e-12 and report["3d_channels_last"] < 1e-12 and report["gradcheck"] == 0.0
    check_block("snl", filter="chebnet2", order=2, dims=(2,))  # on the symmetric SNL graph
    check_block("nl", kernel="linear", normalization="none", dims=(1,), gradcheck=False)  # another normalization


def test_example_takes_the_linear_path(user_parts, monkeypatch):
    """The structured low-rank path, at any degree, and never an N x N tensor (forward and backward)."""
    block = randomize(nonlocalnet.build_block("linear", 8, order=5))
    assert block.units[0]._paths == ("_lowrank_cf",)
    x = torch.randn(2, 8, 6, 7, dtype=torch.float64)
    assert_structured_path(block, x, monkeypatch)
    n = 24 * 24
    assert largest_tensor(nonlocalnet.build_block("linear", 8), torch.randn(2, 8, 24, 24)) < n * n


def test_example_response_is_chebnet2(user_parts):
    block = nonlocalnet.build_block("linear", 8, order=3)
    unit = block.units[0]
    gamma = np.array([0.5, -1.0, 2.0, 0.25])
    with torch.no_grad():
        unit.spectral.gamma.copy_(torch.tensor(gamma))
    lam = np.linspace(-1, 1, 9)
    with torch.no_grad():
        got = unit.responses(torch.tensor(lam)).numpy()[0]
        at_nodes = unit.responses(torch.tensor(np.cos((np.arange(4) + 0.5) * np.pi / 4))).numpy()[0]
    np.testing.assert_allclose(got, chebnet2(gamma, lam), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(at_nodes, np.maximum(gamma, 0), atol=1e-6)  # the learned values, at the nodes
    assert unit.term_labels() == ["chebnet2"]


def test_example_analyses_and_bench(user_parts, tmp_path):
    from nonlocalnet.analysis import Batch, run_affinity, run_attention, run_filter
    from nonlocalnet.bench import run as bench_run
    from nonlocalnet.models import build_model, insert_blocks
    from nonlocalnet.runs import Loaded

    net = build_model("preresnet20", 10)
    insert_blocks(net, {"stage": 1, "after_block": 2, "block": "linear"}, input_shape=(3, 16, 16))
    loaded = Loaded.from_model(net, input_shape=(3, 16, 16))
    (name,) = loaded.blocks
    unit = loaded.blocks[name].units[0]
    gamma = np.array([1.0, 0.0, 0.5, 2.0])
    with torch.no_grad():
        unit.spectral.gamma.copy_(torch.tensor(gamma))
    batch = Batch.from_tensor(torch.randn(2, 3, 16, 16))
    aff = run_affinity(loaded, tmp_path / "aff", batch=batch)
    assert aff["blocks"][0]["n"] == aff["blocks"][0]["n_keys"] == 256
    run_attention(loaded, tmp_path / "att", batch=batch, images=1)
    assert list((tmp_path / "att").glob("*.png"))
    filt = run_filter(loaded, tmp_path / "filt", batch=batch, images=1)
    (u,) = filt["blocks"][0]["units"]
    assert u["filter"] == "chebnet2" and u["terms"] == ["chebnet2"]
    np.testing.assert_allclose(u["responses"][0], chebnet2(gamma, np.asarray(filt["blocks"][0]["lambda"])),
                               rtol=1e-6, atol=1e-6)
    rows = bench_run(blocks=["linear"], backends=["auto", "dense"], sizes=[8], batch=1, channels=16,
                     modes=["fwd"], repeats=1)
    by_backend = {r.backend: r for r in rows}
    assert by_backend["auto"].taken == "lowrank" and by_backend["auto"].time_ms > 0
    assert by_backend["dense"].time_ms > 0


@pytest.mark.parametrize("name", nonlocalnet.list_blocks())
def test_every_preset_passes_the_public_check(name):
    opts = {"reduction": 2} if name == "cc" else {}
    report = check_block(name, dims=(1, 2), gradcheck=False, **opts)
    assert report["1d"] < 1e-8 and report["2d"] < 1e-8


def test_structured_paths_declare_every_field():
    names = {f.name for f in dataclasses.fields(UnitConfig)}
    for path, supports in STRUCTURED_PATHS.items():
        assert set(supports) == names, f"{path} does not declare {names - set(supports)}"
        assert hasattr(NonlocalUnit, path)


def test_a_field_no_path_declares_goes_to_the_generic_path():
    @dataclasses.dataclass(frozen=True)
    class WithNewOption(UnitConfig):
        new_option: bool = True

    base = dict(fusion="add", out_map="linear", map_groups=1, maps=True, value_proj=True, value_bias=True,
                sub_sample=False, norm="bn", filter="fixed")
    assert UnitConfig(**base).handled_by(STRUCTURED_PATHS["_lowrank_cf"])
    assert not WithNewOption(**base).handled_by(STRUCTURED_PATHS["_lowrank_cf"])
    # what the library's units are handled by
    assert nonlocalnet.build_block("snl", 8).units[0]._paths == ("_lowrank_cf",)
    assert nonlocalnet.build_block("heat", 8).units[0]._paths == ()  # a matrix function: its own exact r x r path
    assert nonlocalnet.build_block("gc", 8).units[0]._paths == ("_unary_cf",)
    assert nonlocalnet.build_block("nl", 8, sub_sample=True).units[0]._paths == ()


def test_lowrank_bias_with_an_identity_term():
    """Multi-term filters with biases on a low-rank graph (the Z W_0 term's bias was counted twice before)."""
    for name, opts in [("a2", {"filter": "snl"}), ("gsnl", {"bias": True}), ("nl", {"kernel": "dot_product",
                                                                                    "filter": "cheby", "order": 2})]:
        block = randomize(nonlocalnet.build_block(name, 8, **opts))
        x = torch.randn(2, 8, 5, 4, dtype=torch.float64)
        assert_close(block(x), ref.forward(block, x), rtol=1e-10, atol=1e-10)


def test_reset_parameters_reapplies_zero_init():
    for name in ("nl", "cc", "gc"):
        block = nonlocalnet.build_block(name, 8)
        x = torch.randn(2, 8, 4, 4)
        assert_close(block(x), x)  # a new zero-init block is the identity
        randomize(block).float()
        assert (block(x) - x).abs().max() > 1e-3
        block.reset_parameters()
        assert_close(block(x), x)
    heat = nonlocalnet.build_block("heat", 8)
    with torch.no_grad():
        heat.units[0].spectral.log_scales.add_(1.0)
    heat.reset_parameters()
    assert_close(heat.units[0].spectral.log_scales.exp(), torch.tensor([0.5, 4.0]))


def test_factory_arguments():
    block = nonlocalnet.build_block("snl", 8, dtype=torch.float64, device="cpu")
    assert {p.dtype for p in block.parameters()} == {torch.float64}
    heat = nonlocalnet.build_block("heat", 8, dtype=torch.float64)
    assert heat.units[0].spectral.log_scales.dtype == torch.float64
    assert isinstance(block, nonlocalnet.NonlocalBlock)
    assert block.edges.concat is None and block.edges.mask is None and block.units[0].w_mul is None
    assert nonlocalnet.build_block("gc", 8).units[0].g is None


def test_registries_name_what_is_valid():
    with pytest.raises(ValueError, match=r"kernel: unknown kernel 'relu_dott' \(did you mean 'relu_dot'\?\)"):
        nonlocalnet.build_block("nl", 8, kernel="relu_dott")
    with pytest.raises(ValueError, match="already registered.*replace=True"):
        nonlocalnet.register_kernel(KERNELS["dot_product"])
    with pytest.raises(ValueError, match=r"filter: unknown filter 'haet' \(did you mean 'heat'\?\).*heat, wavelet"):
        nonlocalnet.build_block("nl", 8, filter="haet")
    with pytest.raises(ValueError, match="pretransform='custom' needs a subclass"):
        nonlocalnet.Kernel("mine", "?", pretransform="custom")
    with pytest.raises(ValueError, match="defaults: unknown option"):
        nonlocalnet.register_block(nonlocalnet.Preset("mine", "", dict(colour=1)))
    with pytest.raises(ValueError, match="order: applies to filter 'cheby', 'bernstein', 'gpr', 'cayley', 'heat', "
                                         "'wavelet'"):
        nonlocalnet.build_block("snl", 8, order=2)
    cgnl, snl = nonlocalnet.block_options("cgnl"), nonlocalnet.block_options("snl")
    assert {"groups", "taylor_order", "order", "spectral_path"} <= set(cgnl)
    assert "groups" not in snl and {"order", "approx_order", "kernel"} <= set(snl)

def test_user_block_appears_in_the_lists(user_parts):
    with pytest.raises(ValueError, match="name: unknown block 'lineer' \\(did you mean 'linear'\\?\\).*linear"):
        nonlocalnet.build_block("lineer", 8)


def _legacy_cases():
    with safe_open(str(ROOT / "tests" / "data" / "legacy_blocks.safetensors"), "pt") as f:
        return json.loads(f.metadata()["cases"])


@pytest.mark.parametrize("case", list(_legacy_cases()))
def test_checkpoints_from_before_the_parts_load_and_agree(case):
    """State dicts written by the code before kernels/filters/graph modes were parts (tests/data/
    make_legacy_blocks.py, run on that code): the same keys, and the same outputs (float64)."""
    meta = _legacy_cases()[case]
    with safe_open(str(ROOT / "tests" / "data" / "legacy_blocks.safetensors"), "pt") as f:
        keys = [k for k in f.keys() if k.startswith(f"{case}/")]
        state = {k[len(case) + 7:]: f.get_tensor(k) for k in keys if k.startswith(f"{case}/state/")}
        x, y = f.get_tensor(f"{case}/x"), f.get_tensor(f"{case}/y")
    block = nonlocalnet.build_block(meta["name"], 8, **meta["options"]).double()
    assert set(block.state_dict()) == set(state)
    block.load_state_dict(state, strict=True)
    assert_close(block(x), y, rtol=1e-10, atol=1e-12)


def test_user_graph_mode_reads_its_own_options():
    """A registered graph mode declares its options (Option specs); build_block resolves them, checks them and
    hands them to the mode's build() as ``edges.mode_options`` (also for options Affinity has no keyword for)."""
    from nonlocalnet import affinity as aff
    from nonlocalnet.blocks import PositionsMode
    from nonlocalnet.kernels import GRAPH_MODES, register_graph
    from nonlocalnet.presets import Preset, build_block, register_block
    from nonlocalnet.registry import Option, positive_number

    class Sharpened(PositionsMode):  # the positions graph times a fixed factor s (a user's toy)
        def build(self, edges, x, spatial, budget):
            s = edges.mode_options["sharpness"]
            return aff.ScaledGraph(super().build(edges, x, spatial, budget), torch.tensor(s, dtype=x.dtype))

    register_graph(Sharpened("sharpened", "s·A over the positions (a test's mode)",
                             options={**GRAPH_MODES["positions"].options,
                                      "sharpness": Option(1.0, "the factor s", positive_number)}))
    register_block(Preset("sharpened_nl", "a test", {"out_norm": "none", "zero_init": False, "bias": False},
                          mode="sharpened"))
    try:
        torch.manual_seed(0)
        x = torch.randn(2, 8, 5, 4, dtype=torch.float64)
        plain = build_block("sharpened_nl", 8, dtype=torch.float64)
        assert plain.edges.mode_options["sharpness"] == 1.0  # the Option's default
        three = build_block("sharpened_nl", 8, dtype=torch.float64, sharpness=3.0)
        assert three.edges.mode_options == {**plain.edges.mode_options, "sharpness": 3.0}
        three.load_state_dict(plain.state_dict())
        with torch.no_grad():  # no bias, no normalization: y - x is linear in s
            assert_close(three(x) - x, 3.0 * (plain(x) - x), rtol=1e-12, atol=1e-12)
        with pytest.raises(ValueError, match="sharpness"):
            build_block("sharpened_nl", 8, sharpness=-1.0)
        with pytest.raises(ValueError, match="sharpness"):  # the option is the mode's: other blocks refuse it
            build_block("nl", 8, sharpness=2.0)
    finally:
        PRESETS.unregister("sharpened_nl")
        GRAPH_MODES.unregister("sharpened")
