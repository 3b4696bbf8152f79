"""gradtrace under tf.distribute: MirroredStrategy on 2 logical CPUs and MultiWorkerMirroredStrategy
with 2 worker processes on 127.0.0.1. Each runs in processes of its own (tests/dist_scenarios.py):
logical devices and collective ops cannot be set up in a process where TensorFlow already ran."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import background

ROOT = Path(__file__).resolve().parent.parent


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT), **extra)
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _read(path, proc_out=""):
    assert path.exists(), f"the scenario wrote no result; its output:\n{proc_out[-4000:]}"
    res = json.loads(path.read_text())
    assert "crash" not in res, res["crash"]
    return res


def start_scenarios():
    background.start("dist_mirrored", "tests.dist_scenarios", "mirrored")


@pytest.fixture(scope="module")
def mirrored():
    start_scenarios()  # no-op when conftest started it at collection (it then ran beside the suite)
    return background.result("dist_mirrored", timeout=420)


def test_mirrored_runs_on_two_replicas_with_the_same_weights_as_model_fit(mirrored):
    assert mirrored["replicas"] == 2
    assert mirrored["parity_iterations"][0] == mirrored["parity_iterations"][1] == 16
    assert mirrored["parity_weight_diff"] < 1e-5
    keras_loss, gt_loss = mirrored["parity_loss"]
    assert gt_loss == pytest.approx(keras_loss, rel=1e-5)
    assert mirrored["parity_anomalies"] == []


def test_mirrored_tensorboard_histograms_count_the_global_batch(mirrored):
    assert mirrored["tensorboard"]["steps"] == [0, 5, 10, 15]
    assert mirrored["tensorboard"]["hist_count"] == 32 * 16


def test_mirrored_statistics_are_those_of_the_whole_batch(mirrored):
    checks = mirrored["stats_checks"]
    assert {"output/hidden", "output/out", "gradient/hidden", "gradient/out"} <= set(checks)
    for row, cols in checks.items():
        for col, (got, want) in cols.items():
            assert got == pytest.approx(want, rel=1e-4, abs=1e-5), f"{row} {col}: {got} != {want}"


def test_mirrored_fault_on_one_replica_halts_every_replica_and_names_it(mirrored):
    fault = mirrored["fault"]
    assert len(fault["anomalies"]) == 1, fault
    a = fault["anomalies"][0]
    assert (a["detector"], a["layer"], a["step"], a["replicas"]) == ("nan", "logmodel/log", 3, [1])
    assert "[replica 1]" in a["text"]
    # the held step is measured in full: replica 1's -inf survives the gather, the count is exact
    assert a["min"] == float("-inf") and a["inf"] == 1.0
    assert fault["iterations"] == 3  # the halted step was not applied ...
    assert fault["weights_moved_after_halt"] == 0.0  # ... on any replica


def test_model_built_outside_the_strategy_scope_is_refused_clearly(mirrored):
    err = mirrored["outside_scope"]
    assert err["error"] == "RuntimeError"
    assert "strategy.scope()" in err["message"] and "MirroredStrategy" in err["message"]


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _run_workers(tmp_path, scenario, timeout=300):
    """Start 2 workers of ``scenario``; return each one's (result or None, exit code, output)."""
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs, outs = [], []
    for i in range(2):
        out = tmp_path / f"worker{i}.json"
        outs.append(out)
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.dist_scenarios", scenario, str(out)], cwd=ROOT,
            env=_env(TF_CONFIG=tf_config), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    logs = []
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        for p in procs:  # no worker is left behind, whatever happened
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(json.loads(o.read_text()) if o.exists() else None, p.returncode, log)
            for o, p, log in zip(outs, procs, logs)]


@pytest.mark.multiworker
def test_multi_worker_both_workers_halt_at_the_same_step(tmp_path):
    runs = _run_workers(tmp_path, "worker")
    results = [_read(tmp_path / f"worker{i}.json", log) for i, (_, _, log) in enumerate(runs)]
    for r in results:
        assert r["halted"], r
        assert r["iterations"] == 4, r
        assert len(r["anomalies"]) == 1, r
    a0, a1 = (r["anomalies"][0] for r in results)
    assert a0 == a1  # the same anomaly on both workers
    assert (a0["detector"], a0["layer"], a0["step"]) == ("nan", "logmodel/log", 4)
    assert a0["replicas"] == [1]  # worker 1's replica held the fault
    assert results[0]["weights_sum"] == pytest.approx(results[1]["weights_sum"], rel=1e-6)
    # both workers ran the summary steps (their all-reduce needs both); only the chief wrote
    events = [f for _, _, fs in os.walk(tmp_path / "tb") for f in fs if "tfevents" in f]
    assert len(events) == 1, events


@pytest.mark.multiworker
def test_a_worker_that_dies_gives_the_other_a_clear_error_not_a_hang(tmp_path):
    (survivor, rc0, log0), (dead, rc1, _) = _run_workers(tmp_path, "worker_dies", timeout=180)
    assert rc1 == 17 and dead is None  # worker 1 died at its step 3
    assert survivor is not None and rc0 == 0, log0[-3000:]
    assert survivor["error"] in ("UnavailableError", "DeadlineExceededError", "CancelledError", "AbortedError")
    assert "another worker most likely stopped" in survivor["message"]
    assert survivor["seconds"] < 120  # TensorFlow's heartbeat noticed; it did not hang
    assert survivor["iterations"] == 3  # the step the peer never joined was not applied
    assert survivor["clean"]


def test_mirrored_custom_step_with_two_optimizers_is_watched(mirrored):
    gan = mirrored["gan"]
    assert gan["healthy_anomalies"] == [] and gan["weight_diff"] < 1e-5
    assert gan["loss"][1] == pytest.approx(gan["loss"][0], rel=1e-5)
    assert gan["faulty"][0] == ["nan", 3, "gan/generator/faulty", "d_optimizer"]
    assert gan["iterations"] == [3, 3]  # both updates of the faulty step were held
