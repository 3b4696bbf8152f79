"""The process stays usable after every way a gradtrace.fit can end.

The scenarios (tests/process_scenarios.py) run in processes of their own, started beside the rest of
the suite: one fresh process gives the reference, and one process per context runs every event in a
row, as a notebook or a 50-trial sweep would, each event followed by a plain model.fit and a
gradtrace.fit of a new model and a gradtrace.fit of the same model.
"""

import numpy as np
import pytest

from tests import background
from tests.process_scenarios import CONTEXTS, EVENTS

MODULE = "tests.process_scenarios"


def start_scenarios():
    background.start("process_fresh", MODULE, "fresh")
    for context in CONTEXTS:
        background.start(f"process_{context}", MODULE, "sequence", context)


@pytest.fixture(scope="module")
def runs():
    start_scenarios()  # no-op when conftest started them at collection
    return {"fresh": background.result("process_fresh"),
            **{c: background.result(f"process_{c}") for c in CONTEXTS}}


def _diff(got, ref):
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(got, ref))


# what each event must have done, before the process is checked
EXPECTED = {
    "healthy": dict(error=None, detectors=set()),
    "halt": dict(error=None, detectors={"nan"}),
    "raise": dict(error="AnomalyError", detectors={"nan"}),
    "snapshot": dict(error=None, detectors={"fire_at_third_call"}),
    "interrupt": dict(error="KeyboardInterrupt", detectors=set()),
    "failing_callback": dict(error="ValueError", detectors=set()),
}


@pytest.mark.parametrize("event", EVENTS)
@pytest.mark.parametrize("context", CONTEXTS)
def test_after_each_way_a_fit_ends_the_process_trains_as_a_fresh_one(runs, context, event):
    r = runs[context][f"{context}/{event}"]
    assert "crash" not in r, r.get("crash")
    # the event itself happened as intended and left the model clean
    want = EXPECTED[event]
    assert r["error"] == want["error"]
    assert {a.split("]")[0].lstrip("[") for a in r["anomalies"]} == want["detectors"], r["anomalies"]
    assert r["finite"]
    if event == "snapshot":
        assert len(r["snapshots"]) == 1
    # no global TensorFlow/Keras setting changed: check-numerics and dumping off (no op callbacks),
    # the dtype policy, floatx, the default strategy, eager/jit flags
    assert r["settings"] == r["settings_expected"]
    assert r["settings"]["op_callbacks"] == 0 and not r["settings"]["has_strategy"]
    # (a) a plain model.fit and (b) a gradtrace.fit of a new model match a fresh process, exactly
    ref = runs["fresh"][context]
    assert _diff(r["plain_new_model"]["weights"], ref["weights"]) == 0.0
    assert r["plain_new_model"]["loss"] == ref["loss"]
    assert _diff(r["gradtrace_new_model"]["weights"], ref["weights"]) == 0.0
    assert r["gradtrace_new_model"]["loss"] == ref["loss"]
    assert r["gradtrace_new_model"]["anomalies"] == []
    # (c) the same model trains on exactly as model.fit would from the state the event left
    assert r["same_model"]["diff"] == 0.0
    assert r["same_model"]["anomalies"] == []
    assert np.isfinite(r["same_model"]["loss"]).all()


@pytest.mark.parametrize("context", CONTEXTS)
def test_a_healthy_gradtrace_fit_leaves_every_random_stream_where_model_fit_leaves_it(runs, context):
    """NumPy, Python, TensorFlow's global seed and Keras' global seed generator: the next draw after a
    gradtrace.fit equals the next draw after a plain model.fit of the same model from the same seed."""
    assert runs[context][f"{context}/healthy"]["draws"] == runs["fresh"][context]["draws"]


def test_the_sequence_left_the_global_settings_as_it_found_them(runs):
    for context in CONTEXTS:
        assert runs[context]["settings_after"] == runs[context]["settings_before"]


def test_mirrored_follow_ups_ran_under_both_the_same_and_a_new_strategy(runs):
    """Each pairing (plain fit / gradtrace fit, same / new strategy object) is covered."""
    seen = {(k, runs["mirrored"][f"mirrored/{e}"][k]["strategy"]) for e in EVENTS
            for k in ("plain_new_model", "gradtrace_new_model")}
    assert seen == {(k, s) for k in ("plain_new_model", "gradtrace_new_model") for s in ("same", "new")}
