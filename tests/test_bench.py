"""`nonlocalnet bench --quick` as a smoke test (no timing assertion): it runs, and the ratios are real."""

from __future__ import annotations

import json

from nonlocalnet.cli import main


def test_bench_quick_smoke(tmp_path, capfd):
    out = tmp_path / "bench.json"
    plot = tmp_path / "loglog.png"
    assert main(["bench", "--quick", "--sizes", "8", "12", "--repeats", "1", "--floor", "--json", str(out),
                 "--plot", str(plot)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["block"] for r in rows} == {"snl", "nl"}
    dense = [r for r in rows if r["backend"] == "dense"]
    assert dense and all(r["time_ratio"] == 1.0 for r in dense)
    auto = [r for r in rows if r["backend"] == "auto"]
    assert all(r["time_ms"] > 0 and r["peak_mib"] > 0 and r["time_ratio"] > 0 for r in auto)
    assert {r["taken"] for r in auto if r["block"] == "nl"} == {"sdpa"}
    assert data["floor"] and all(f["ratio"] > 0 for f in data["floor"])
    assert plot.stat().st_size > 1000
    err = capfd.readouterr().err
    assert "USDT" not in err and "snl" in err  # the profiler's C-level log lines are silenced, progress is not


def test_bench_spectral_smoke(tmp_path):
    """`nonlocalnet bench --spectral`: every case runs and is recorded (no timing assertion)."""
    out = tmp_path / "spectral.json"
    assert main(["bench", "--spectral", "--sizes", "4", "--channels", "8", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    cases = {r["case"] for r in rows}
    assert {"heat exact", "cayley exact", "wavelet exact", "cheby 2", "cheby 8", "heat dense eigh",
            "spectrum core", "spectrum dense"} <= cases
    assert all(r["ms"] > 0 for r in rows)
