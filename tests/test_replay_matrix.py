"""Halt, snapshot and replay through every entry point, with and without XLA, with and without a strategy
(tests/replay_matrix.py runs the cells in processes of their own, beside the suite).

Not in the matrix: ``jit_compile=True`` under MirroredStrategy (Keras resolves ``jit_compile="auto"`` to
False under any strategy, and an explicit True fails in ``model.fit`` itself on logical CPUs: an XLA
cluster is on one device), and ``gradtrace.loop`` around a step that calls ``strategy.run`` (the
replicas' updates run in threads of their own, which gradtrace does not watch: it says so).
"""

import pytest

from tests import background
from tests.test_distribute import start_scenarios as start_distribute

CELLS = [(entry, jit) for entry in ("fit", "Watch", "watch") for jit in (False, True)]


def start_scenarios():
    background.start("replay_matrix", "tests.replay_matrix", "all")


@pytest.fixture(scope="module")
def single():
    start_scenarios()
    return background.result("replay_matrix", timeout=600)


@pytest.fixture(scope="module")
def mirrored():
    start_distribute()
    return background.result("dist_mirrored", timeout=600)["matrix"]


def _check(cell, distributed=False):
    snap, rep, halt = cell["snapshot"], cell["replay"], cell["halt"]
    # snapshot: both occurrences of the fault written, its update skipped, every weight and slot finite
    assert [tuple(f)[:3] for f in snap["found"]] == [("nan", "logmodel/log", 2), ("nan", "logmodel/log", 5)]
    assert snap["written"] == [True, True] and snap["finite"] and snap["iterations"] == 6
    # replay: the same finding, the op that made the -inf, the recorded statistics reproduced
    assert [tuple(f) for f in rep["found"]] == [("nan", "logmodel/log")]
    assert rep["origin"] == ["logmodel/log", "Log"]
    assert rep["difference"] < (1e-6 if distributed else 1e-12)  # bit for bit on one device
    # halt: stopped at the step, nothing of it applied, its snapshot written
    assert [tuple(f) for f in halt["found"]] == [("nan", "logmodel/log", 2)]
    assert halt["halted"] and halt["iterations"] == 2 and halt["finite"] and halt["snapshot"]


@pytest.mark.parametrize("entry,jit", CELLS, ids=[f"{e}-jit{j}" for e, j in CELLS])
def test_halt_snapshot_and_replay(single, entry, jit):
    _check(single[f"{entry}-{jit}"])


@pytest.mark.parametrize("entry", ["fit", "Watch"])
def test_halt_snapshot_and_replay_under_mirrored_strategy(mirrored, entry):
    _check(mirrored[f"{entry}-False"], distributed=True)
