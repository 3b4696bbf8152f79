"""The overhead benchmark runs end to end (a few steps of one model), so it cannot rot.

Timings are the benchmark's job, not a test's: nothing here asserts a speed.
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import gate  # noqa: E402
import overhead  # noqa: E402


def test_benchmark_smoke_writes_a_complete_table(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    assert overhead.main(["--smoke", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    res = doc["models"]["depth_10"]
    assert set(res) == {"keras", "gradtrace", "gradtrace_budget5", "gradtrace_every16", "terminate_on_nan"}
    assert res["keras"]["step_ratio"] == 1.0 and res["keras"]["round_step_ratios"] == [1.0]
    assert 0 < res["gradtrace_budget5"]["traced_share"] <= 1
    for r in res.values():
        assert r["step_ms"] > 0 and r["first_step_s"] > 0 and r["steps_timed"] >= 1
    assert doc["machine"]["tensorflow"] and doc["machine"]["cpus"]
    assert "gradtrace_every16" in capsys.readouterr().out


def test_gate_benchmark_runs_every_variant(capsys):
    rows = gate.main(["--models", "depth_10", "--steps", "2", "--rounds", "1"])
    assert [r[1] for r in rows] == gate.VARIANTS
    assert all(float(r[2]) > 0 for r in rows) and rows[0][3] == "1.00/1.00/1.00"
    assert "keras_lossscale" in capsys.readouterr().out


def test_step_parts_times_the_compiled_functions():
    import step_parts

    rows = step_parts.main(["--models", "depth_10", "--variants", "guarded", "--rounds", "1", "--calls", "1"])
    assert [r[1] for r in rows] == ["plain", "guarded"] and rows[0][3] == "1.00/1.00/1.00"
    assert all(float(r[2]) > 0 for r in rows)
