"""The detector contract, on statistics written by hand: for every built-in detector, a table of rows
and a matrix whose values are chosen here, the rows it must fire on (or stay silent on), and the row
its explanation must blame. No model, no training: each check runs eagerly on the numbers below.
"""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

import gradtrace
from gradtrace.detectors import BUILTINS
from gradtrace.graph import LayerGraph
from gradtrace.stats import COL, COLUMNS, Lookup, Row, StatsView, Table


def R(i, kind, path, order, **kw):
    return Row(index=i, kind=kind, path=path, order=order, layer_class=kw.pop("cls", "Dense"), **kw)


def matrix(rows, **cols):
    """``cols``: column name -> {row index: value}; everything else 0 (size 100)."""
    m = np.zeros((len(rows), len(COLUMNS)), np.float32)
    m[:, COL["size"]] = 100.0
    for name, values in cols.items():
        for i, v in values.items():
            m[i, COL[name]] = v
    return m


def run(detector, rows, m, steps=1, graph=None, **view_kw):
    """Check ``steps`` times on the same statistics; return (fired [steps, rows], values, explained)."""
    table = Table(rows, graph)
    fired_all, values = [], None
    for s in range(steps):
        view = StatsView(table, tf.constant(m), step=tf.constant(s, tf.int64), **view_kw)
        f, v = detector.check(view)
        fired_all.append(np.asarray(f, bool))
        values = np.asarray(v, np.float32)
    fired = fired_all[-1]
    explained = list(detector.explain(rows, fired, values, m, table)) if fired.any() else []
    for e in explained:  # every finding comes with a one-line hint
        assert len(e) == 4 and e[3] and "\n" not in e[3], e
    return np.array(fired_all), values, explained


# a small MLP: input -> d1 (relu) -> d2 (relu) -> out (head), each with its weight gradient, and the loss
def mlp_rows(head_activation="linear", head_units=1, loss_kind="regression", from_logits=False):
    rows = [
        R(0, "target", "targets", 0, cls=""),
        R(1, "output", "m/d1", 0, relu=True, activation="relu", shape=(32, 8)),
        R(2, "output", "m/d2", 1, relu=True, activation="relu", shape=(32, 8)),
        R(3, "output", "m/out", 2, activation=head_activation, shape=(32, head_units), head=True),
        R(4, "loss", "loss", 3, cls="loss", loss_kind=loss_kind, from_logits=from_logits),
        R(5, "gradient", "m/d1", 0), R(6, "gradient", "m/d2", 1), R(7, "gradient", "m/out", 2),
        R(8, "weight_gradient", "m/d1", 0, name="kernel"), R(9, "weight_gradient", "m/d2", 1, name="kernel"),
        R(10, "weight_gradient", "m/out", 2, name="kernel"),
    ]
    return rows


def test_every_builtin_detector_has_a_contract_case_here():
    covered = {"nan", "exploding", "vanishing", "dead_relu", "head_mismatch", "no_gradient", "scale_growth",
               "saturation", "loss_plateau", "embedding_out_of_range", "unused_embedding", "embedding_twins",
               "embedding_collapse", "divergence", "labels_out_of_range", "embedding_rows", "gradient_cut",
               "identical_units", "no_progress", "penalties", "update_size"}
    assert set(BUILTINS) == covered


def test_nan_blames_the_first_forward_layer_before_the_backward_pass():
    rows = mlp_rows()
    m = matrix(rows, nan={2: 3, 3: 32, 4: 1, 5: 8, 8: 8}, inf={9: 1})
    fired, _, ex = run(gradtrace.NaN(), rows, m)
    assert fired[0][[2, 3, 4, 5, 8, 9]].all() and not fired[0][[0, 1]].any()
    assert ex[0][0].path == "m/d2" and ex[0][0].kind == "output"


def test_nan_in_the_targets_blames_the_data():
    rows = mlp_rows()
    _, _, ex = run(gradtrace.NaN(), rows, matrix(rows, nan={0: 1, 3: 0, 4: 1}))
    assert ex[0][0].kind == "target" and "the data is to blame" in ex[0][2]


def test_exploding_absolute_and_against_its_own_average():
    rows = mlp_rows()
    fired, _, ex = run(gradtrace.Exploding(), rows, matrix(rows, norm={8: 5e6, 9: 2e6, 10: 1.0}))
    assert fired[0][[8, 9]].all() and not fired[0][10]
    assert ex[0][0].path == "m/d2"  # nearest the loss first, in backward order
    det = gradtrace.Exploding(warmup=3)
    calm = matrix(rows, norm={i: 2.0 for i in (5, 6, 7, 8, 9, 10)})
    fired, _, _ = run(det, rows, calm, steps=4)
    assert not fired.any()
    jump = calm.copy()
    jump[6, COL["norm"]] = 500.0  # 250x its average of 2
    fired, _, ex = run(det, rows, jump)
    assert fired[0][6] and fired[0].sum() == 1 and "running average" in ex[0][2]


def test_vanishing_needs_a_run_from_the_first_layer_and_ignores_cut_gradients():
    rows = mlp_rows()
    det = gradtrace.Vanishing(patience=2)
    tiny = matrix(rows, norm={8: 1e-9, 9: 1e-9, 10: 1.0})
    fired, _, ex = run(det, rows, tiny, steps=2)
    assert not fired[0].any() and fired[1][[8, 9]].all()
    assert ex[0][0].path == "m/d1"
    middle_only = matrix(rows, norm={8: 1.0, 9: 1e-9, 10: 1.0})  # one small layer between healthy ones
    assert not run(gradtrace.Vanishing(patience=1), rows, middle_only)[0].any()
    cut = matrix(rows, norm={8: 0.0, 9: 0.0, 10: 1.0})  # exactly zero: cut off, not vanishing
    assert not run(gradtrace.Vanishing(patience=1), rows, cut)[0].any()


# an encoder-decoder: the encoder (run first) reaches the loss through cross-attention ("m/cross"), beside
# the decoder's embedding, not below it
SEQ2SEQ = LayerGraph(
    depth={"m/enc": 3, "m/dec_emb": 3, "m/cross": 2, "m/ffn": 1, "m/out": 0},
    downstream={"m/enc": {"m/cross", "m/ffn", "m/out"}, "m/dec_emb": {"m/cross", "m/ffn", "m/out"},
                "m/cross": {"m/ffn", "m/out"}, "m/ffn": {"m/out"}, "m/out": set()},
    order={"m/enc": 0, "m/dec_emb": 1, "m/cross": 2, "m/ffn": 3, "m/out": 4},
    consumers={"m/enc": {"m/cross"}, "m/dec_emb": {"m/cross"}, "m/cross": {"m/ffn"}, "m/ffn": {"m/out"}})


def seq2seq_rows():
    paths = ["m/enc", "m/dec_emb", "m/cross", "m/ffn", "m/out"]
    return ([R(i, "gradient", p, i) for i, p in enumerate(paths)]
            + [R(5 + i, "weight_gradient", p, i, name="kernel") for i, p in enumerate(paths)]
            + [R(10, "loss", "loss", 5, cls="loss")])


def test_vanishing_compares_a_layer_with_the_layers_it_feeds_by_the_graph_not_by_execution_order():
    rows = seq2seq_rows()
    # the encoder's gradient is 1e-6 of the decoder embedding's (a position table: every example adds
    # to its rows), but 1e-2 of the layers it feeds: healthy
    m = matrix(rows, norm={5: 1e-6, 6: 1.0, 7: 1e-4, 8: 1e-4, 9: 1e-4})
    assert run(gradtrace.Vanishing(patience=1), rows, m)[0].any()  # execution order: a false alarm
    assert not run(gradtrace.Vanishing(patience=1), rows, m, graph=SEQ2SEQ)[0].any()
    # vanished below everything it feeds: fires, and the bottom layer is blamed
    m = matrix(rows, norm={5: 1e-9, 6: 1e-9, 7: 1e-9, 8: 1.0, 9: 1.0})
    fired, _, ex = run(gradtrace.Vanishing(patience=1), rows, m, graph=SEQ2SEQ)
    assert fired[0][[5, 6, 7]].all() and ex[0][0].path == "m/enc"


def test_nan_made_by_a_backward_pass_blames_the_layer_that_reads_the_output():
    rows = seq2seq_rows()
    # forward finite; the encoder's output gradient is NaN, cross-attention's is finite: the NaN was made
    # in cross-attention's backward pass (a sqrt of 0 there)
    m = matrix(rows, nan={0: 4, 5: 8})
    _, _, ex = run(gradtrace.NaN(), rows, m, graph=SEQ2SEQ)
    assert ex[0][0].path == "m/cross" and "backward pass produced" in ex[0][2] and "epsilon" in ex[0][3]
    _, _, ex = run(gradtrace.NaN(), rows, m)  # no graph: the first non-finite gradient in backward order
    assert ex[0][0].path == "m/enc"


def _divergence_run(det, rows, losses, table=None, **cols):
    """Feed ``losses`` (one per step) to the loss row; return the fired flags per step and the last explanation."""
    table = table or Table(rows)
    loss_i = next(r.index for r in rows if r.kind == "loss")
    fired_at, ex = [], []
    for s, value in enumerate(losses):
        m = matrix(rows, mean={loss_i: value}, **cols)
        if not np.isfinite(value):
            m[loss_i, COL["nan"]] = 1.0
        f, v = det.check(StatsView(table, tf.constant(m), step=tf.constant(s, tf.int64)))
        f = np.asarray(f, bool)
        fired_at.append(bool(f.any()))
        if f.any():
            ex = list(det.explain(rows, f, np.asarray(v), m, table))
    return fired_at, ex


def test_divergence_fires_on_a_run_away_loss_and_blames_the_learning_rate_inputs_or_targets():
    import keras

    rows = mlp_rows() + [R(11, "input", "inputs", 0, cls="")]
    table = Table(rows)
    table.optimizer = keras.optimizers.SGD(0.5)
    fired, ex = _divergence_run(gradtrace.Divergence(), rows, [1.0, 0.8, 30.0, 900.0, 2e4], table,
                                norm={11: 10.0})  # inputs RMS 1 (norm 10 over 100 values)
    assert fired == [False, False, False, True, False]  # two steps above 10x, once per run-away
    assert ex[0][0].path == "learning rate" and "0.5" in ex[0][2] and "0.05" in ex[0][3]
    # the same run-away on inputs of RMS 300: the data's scale is to blame
    fired, ex = _divergence_run(gradtrace.Divergence(), rows, [1.0, 0.8, 30.0, 900.0], norm={11: 3000.0})
    assert fired[3] and ex[0][0].path == "inputs" and "standardise" in ex[0][3]
    # a regression whose targets have RMS 500
    fired, ex = _divergence_run(gradtrace.Divergence(), rows, [1.0, 0.8, 30.0, 900.0], norm={0: 5000.0})
    assert ex[0][0].path == "targets"
    # overflow right after one step above 10x: at once
    assert _divergence_run(gradtrace.Divergence(), rows, [1.0, 50.0, float("inf")])[0] == [False, False, True]
    # silent: a slow climb (a GAN generator's loss), one bad batch, a loss that falls
    assert not any(_divergence_run(gradtrace.Divergence(), rows, list(np.geomspace(1.0, 200.0, 60)))[0])
    assert not any(_divergence_run(gradtrace.Divergence(), rows, [1.0, 0.5, 0.1, 12.0, 0.1, 0.1, 15.0, 0.1])[0])
    assert not any(_divergence_run(gradtrace.Divergence(), rows, [2.3, 1.5, 0.9, 0.5, 0.2, 0.05])[0])
    # NaN in the first step is not a run-away (nothing to grow from): the nan detector's
    assert not any(_divergence_run(gradtrace.Divergence(), rows, [float("nan"), float("nan")])[0])
    # a loss that has been negative, or a cosine similarity (around 0 at the start), has no scale
    assert not any(_divergence_run(gradtrace.Divergence(), rows, [0.05, -0.1, 2.0, 3.0, 4.0])[0])
    cosine = [dataclasses.replace(r, loss_kind="bounded") if r.kind == "loss" else r for r in rows]
    assert not any(_divergence_run(gradtrace.Divergence(), cosine, [0.01, 0.5, 0.6, 0.7])[0])


def test_labels_out_of_range_names_the_label_and_the_units():
    rows = [Row(index=0, kind="labels", path="targets", layer_class="labels", input_dim=3, shape=(8,))]
    m = matrix(rows, bad={0: 2}, bad_value={0: 3}, bad_index={0: 5}, min={0: 1}, max={0: 3})
    fired, _, ex = run(gradtrace.LabelsOutOfRange(), rows, m)
    assert fired[0][0] and ex[0][0].path == "targets" and "label 3" in ex[0][2] and "y - 1" in ex[0][3]
    assert not run(gradtrace.LabelsOutOfRange(), rows, matrix(rows, min={0: 0}, max={0: 2}))[0].any()


def test_embedding_rows_exploding_rows_and_rows_that_never_learn():
    import keras

    layer = keras.layers.Embedding(10, 4)
    layer.build((None,))
    rows = [Row(index=0, kind="ids", path="m/items", layer_class="Embedding", input_dim=10, shape=(8,))]
    ids = tf.constant([1, 2, 3, 4, 5, 6, 7, 2])
    start = np.ones((8, 4), np.float32) * 0.05  # norm 0.1: the first step sets the table's reference
    gathered = start * 10.0  # every row at norm 1: 10x its start, but below min_norm
    hot = gathered.copy()
    hot[3] *= 50.0  # id 4: norm 50, 500x its start
    det = gradtrace.EmbeddingRows(patience=2)
    table = Table(rows)
    fired = []
    for s, g in enumerate((start, gathered, gathered, hot, hot, hot)):
        view = StatsView(table, tf.constant(matrix(rows)), step=tf.constant(s, tf.int64),
                         lookups={0: Lookup(ids, tf.constant(g), tf.zeros([8, 4]), layer)})
        f, v = det.check(view)
        fired.append(bool(np.asarray(f)[0]))
        if fired[-1]:
            ex = list(det.explain(rows, np.array([True]), np.asarray(v), matrix(rows), table))
    assert fired == [False, False, False, False, True, False]  # after `patience` steps, once per episode
    assert ex[0][0].path == "m/items" and "worst ids: 4" in ex[0][2] and "500x" in ex[0][2]
    # no lookup ever got a gradient (the zeros above): no row learned (a table cut off whole is gradient_cut's)
    assert not det.moved()["m/items"].any()


def test_exploding_blames_where_the_forward_pass_grew_or_the_data():
    rows = mlp_rows() + [R(11, "input", "inputs", 0, cls="")]
    graph = LayerGraph(depth={"m/d1": 2, "m/d2": 1, "m/out": 0},
                       downstream={"m/d1": {"m/d2", "m/out"}, "m/d2": {"m/out"}, "m/out": set()},
                       order={"m/d1": 0, "m/d2": 1, "m/out": 2},
                       consumers={"m/d1": {"m/d2"}, "m/d2": {"m/out"}},
                       feeders={"m/d1": set(), "m/d2": {"m/d1"}, "m/out": {"m/d2"}})
    # d2's output is 1000x its input (RMS 1 -> 1000): the out layer's weight gradient explodes
    m = matrix(rows, norm={11: 10.0, 1: 10.0, 2: 1e4, 3: 1e4, 10: 5e6})
    _, _, ex = run(gradtrace.Exploding(), rows, m, graph=graph)
    assert ex[0][0].path == "m/d2" and "blew up" in ex[0][2]
    # no layer grows, the inputs are on a large scale (RMS 1000)
    m = matrix(rows, norm={11: 1e4, 1: 1e4, 2: 1e4, 3: 1e4, 8: 5e6})
    _, _, ex = run(gradtrace.Exploding(), rows, m, graph=graph)
    assert ex[0][0].path == "inputs" and "standardise" in ex[0][3]
    # nothing to blame outside: the layer nearest the loss, as without a graph
    m = matrix(rows, norm={11: 10.0, 1: 10.0, 2: 10.0, 3: 10.0, 9: 5e6})
    _, _, ex = run(gradtrace.Exploding(), rows, m, graph=graph)
    assert ex[0][0].path == "m/d2"


def test_dead_relu_counts_examples_per_unit_and_blames_the_first_dead_layer():
    rows = mlp_rows()
    m = matrix(rows)
    # d1: all 8 units dead; d2: 8 units, 2 alive
    alive = tf.constant([0.0] * 8 + [1, 1, 0, 0, 0, 0, 0, 0])
    units = [(1, 8), (2, 8)]
    det = gradtrace.DeadReLU(quick=64, window=1000)
    fired, values, ex = run(det, rows, m, steps=2, alive=alive, unit_rows=units, examples=tf.constant(32.0))
    assert not fired[0].any()  # 32 examples: not yet
    assert fired[1][1] and not fired[1][2]  # d1 wholly dead after 64; d2 has live units, window not reached
    assert values[1] == 1.0 and ex[0][0].path == "m/d1" and "own weights and bias" in ex[0][2]
    # a NaN anywhere: the step counts for nothing
    det = gradtrace.DeadReLU(quick=64)
    bad = matrix(rows, nan={3: 1})
    fired, _, _ = run(det, rows, bad, steps=3, alive=alive, unit_rows=units, examples=tf.constant(32.0))
    assert not fired.any()


@pytest.mark.parametrize("activation, units, loss, from_logits, target_range, code", [
    ("softmax", 1, "binary_crossentropy", False, (0.0, 1.0), 1),
    ("sigmoid", 1, "regression", False, (5.0, 50.0), 2),
    ("relu", 1, "regression", False, (-2.0, 2.0), 3),
    ("relu", 3, "categorical_crossentropy", False, (0.0, 1.0), 4),
    ("linear", 1, "binary_crossentropy", False, (0.0, 1.0), 5),
    # silent: what fits together
    ("sigmoid", 1, "binary_crossentropy", False, (0.0, 1.0), 0),
    ("linear", 1, "binary_crossentropy", True, (0.0, 1.0), 0),
    ("linear", 1, "regression", False, (-50.0, 50.0), 0),
    ("softmax", 3, "categorical_crossentropy", False, (0.0, 1.0), 0),
    ("relu", 1, "regression", False, (0.0, 9.0), 0),
])
def test_head_mismatch_cases(activation, units, loss, from_logits, target_range, code):
    rows = mlp_rows(activation, units, loss, from_logits)
    m = matrix(rows, min={0: target_range[0]}, max={0: target_range[1]})
    det = gradtrace.HeadMismatch()
    fired, values, ex = run(det, rows, m, steps=2)
    if code == 0:
        assert not fired.any()
        return
    assert fired[0][3] and fired[0].sum() == 1 and not fired[1].any()  # the output layer, once
    assert values[3] == code and ex == [] and det.name == "head_mismatch"
    _, _, ex = run(gradtrace.HeadMismatch(), rows, m)
    assert ex[0][0].path == "m/out" and ex[0][3]  # blamed, with a hint


def test_no_gradient_blames_the_first_constant_output():
    rows = mlp_rows("softmax")
    m = matrix(rows, mean={4: 0.7}, min={1: -1.0, 3: 1.0}, max={1: 2.0, 3: 1.0}, norm={1: 3.0, 2: 4.0, 3: 10.0})
    fired, _, ex = run(gradtrace.NoGradient(), rows, m)
    assert fired[0][4] and fired[0].sum() == 1
    assert ex[0][0].path == "m/out" and "softmax over one unit" in ex[0][2]
    # any gradient, or a loss at its minimum: silent
    assert not run(gradtrace.NoGradient(), rows, matrix(rows, mean={4: 0.7}, norm={9: 1e-3}))[0].any()
    assert not run(gradtrace.NoGradient(), rows, matrix(rows, mean={4: 0.0}))[0].any()


def test_scale_growth_fires_on_growth_through_depth_not_on_a_large_input_scale():
    rows = [R(0, "output", "m/h0", 0, shape=(32, 64)), R(1, "output", "m/h1", 1, shape=(32, 64)),
            R(2, "output", "m/h2", 2, shape=(32, 64)), R(3, "output", "m/out", 3, shape=(32, 1), head=True)] + [
        R(4 + i, "weight_gradient", f"m/{p}", i, name="kernel") for i, p in enumerate(("h0", "h1", "h2", "out"))]
    rms = lambda r: r * np.sqrt(100.0)  # noqa: E731 - norm of 100 values with that RMS
    grown = matrix(rows, norm={0: rms(2.0), 1: rms(60.0), 2: rms(2000.0)})
    fired, values, ex = run(gradtrace.ScaleGrowth(), rows, grown)
    assert fired[0][0] and fired[0].sum() == 1 and values[0] == pytest.approx(1000.0, rel=1e-4)
    assert ex[0][0].path == "m/h0" and "initialised at too large a scale" in ex[0][2]
    flat_but_large = matrix(rows, norm={0: rms(500.0), 1: rms(700.0), 2: rms(900.0)})
    assert not run(gradtrace.ScaleGrowth(), rows, flat_but_large)[0].any()
    # the initialisation only: once per fit, and never after the optimizer's first update (a scale grown
    # later was grown by the updates: exploding and divergence say so)
    assert run(gradtrace.ScaleGrowth(), rows, grown, steps=3)[0].sum() == 1
    view = StatsView(Table(rows), tf.constant(grown), step=tf.constant(7, tf.int64))
    assert not np.asarray(gradtrace.ScaleGrowth().check(view)[0]).any()


def test_scale_growth_measures_one_chain_of_hidden_layers():
    """A second network beside the first (a distillation teacher trained elsewhere, its logits large) is
    not measured against the first, and no network's output layer counts: its scale is the task's."""
    student, teacher = ["m/s0", "m/s1", "m/s2", "m/s_out"], ["m/t0", "m/t1", "m/t2", "m/t_out"]
    paths = student + teacher
    rows = [R(i, "output", p, i, shape=(32, 64), head=p == "m/s_out") for i, p in enumerate(paths)] + [
        R(8 + i, "weight_gradient", p, i, name="kernel") for i, p in enumerate(paths)]
    chain = lambda ps: {p: set(ps[k + 1:]) for k, p in enumerate(ps)}  # noqa: E731
    graph = LayerGraph(depth={p: 3 - k % 4 for k, p in enumerate(paths)}, downstream={**chain(student), **chain(teacher)},
                       order={p: k for k, p in enumerate(paths)})
    rms = lambda r: r * np.sqrt(100.0)  # noqa: E731
    # the student at initialisation (RMS 0.5 throughout), the trained teacher's logits at RMS 40
    m = matrix(rows, norm={0: rms(0.5), 1: rms(0.5), 2: rms(0.5), 3: rms(0.5), 4: rms(1.0), 5: rms(2.0),
                           6: rms(3.0), 7: rms(40.0)})
    assert not run(gradtrace.ScaleGrowth(), rows, m, graph=graph)[0].any()
    # the student's own growth through its hidden layers still fires, and is blamed inside the student
    grown = matrix(rows, norm={0: rms(0.5), 1: rms(20.0), 2: rms(900.0)})
    fired, _, ex = run(gradtrace.ScaleGrowth(), rows, grown, graph=graph)
    assert fired[0][0] and ex[0][0].path in ("m/s0", "m/s1", "m/s2")


def test_saturation_and_loss_plateau():
    rows = [R(0, "output", "m/s", 0, activation="sigmoid"), R(1, "loss", "loss", 1, cls="loss")]
    fired, _, _ = run(gradtrace.Saturation(patience=2), rows, matrix(rows, saturated={0: 0.95}), steps=3)
    assert fired[:, 0].tolist() == [False, True, False]  # once per episode
    fired, _, _ = run(gradtrace.Saturation(), rows, matrix(rows, saturated={0: 0.995}), steps=3)
    assert fired[:, 0].tolist() == [False, False, True]  # all but wholly saturated: after `quick` steps
    head = [R(0, "output", "m/s", 0, activation="sigmoid", head=True), R(1, "loss", "loss", 1, cls="loss")]
    assert not run(gradtrace.Saturation(), head, matrix(head, saturated={0: 1.0}), steps=30)[0].any()
    det = gradtrace.LossPlateau(window=3)
    fired, _, _ = run(det, rows, matrix(rows, mean={1: 1.0}), steps=6)
    assert fired.any() and not fired[:2].any()


def test_embedding_out_of_range_reads_the_ids_rows():
    rows = [Row(index=0, kind="ids", path="m/emb", layer_class="Embedding", input_dim=10)]
    m = matrix(rows, bad={0: 1}, bad_value={0: 12}, bad_index={0: 3}, min={0: 0}, max={0: 12})
    fired, _, ex = run(gradtrace.EmbeddingOutOfRange(), rows, m)
    assert fired[0][0] and ex[0][0].path == "m/emb" and "12" in ex[0][2]
    assert not run(gradtrace.EmbeddingOutOfRange(), rows, matrix(rows, max={0: 9}))[0].any()


def test_unused_embedding_at_the_end_of_an_epoch():
    rows = [Row(index=0, kind="ids", path="m/emb", layer_class="Embedding", input_dim=100)]
    det = gradtrace.UnusedEmbedding()
    det.reset()  # as the engine does at the start of every fit
    ids = tf.constant(np.tile(np.arange(10), 40).astype("int32"))  # 400 lookups of ids 0..9
    table = Table(rows)
    det.check(StatsView(table, tf.constant(matrix(rows)), step=tf.constant(0), ids={0: ids}))
    found = list(det.epoch_end(None))
    assert len(found) == 1 and found[0][0] == "m/emb" and found[0][2] == pytest.approx(0.9)
    assert "highest id seen 9" in found[0][3] and "input_dim=10" in found[0][4]


def test_unused_embedding_leaves_a_frequency_sorted_vocabulary_alone():
    """10,000 rows, 30,000 Zipf(1.3) lookups over frequency-sorted ids: ~80% of rows unused by nature (a
    rule on coverage alone fires here); the ids are spread as a real vocabulary's are. The same table fed
    ids from a 5% subset spread over its range (a vocabulary built on another split) is caught."""
    rows = [Row(index=0, kind="ids", path="m/words", layer_class="Embedding", input_dim=10000)]
    rng = np.random.default_rng(1)
    p = np.arange(1, 10001) ** -1.3
    zipf = rng.choice(10000, size=30000, p=p / p.sum()).astype("int32")
    subset = rng.choice(np.arange(0, 10000, 20), size=30000).astype("int32")
    for ids, fires in ((zipf, False), (subset, True)):
        assert (1 - len(np.unique(ids)) / 10000 > 0.75)  # most rows unused either way
        det = gradtrace.UnusedEmbedding()
        det.check(StatsView(Table(rows), tf.constant(matrix(rows)), step=tf.constant(0), ids={0: tf.constant(ids)}))
        found = list(det.periodic(None))  # the same check, run every `every` steps as at epoch end
        assert bool(found) == fires, found
    assert "Zipf-like" in found[0][3] and "500 of its 10000 rows" in found[0][3]
    # each of the 500 ids seen 60 times on average, spread up to the top of the table: raw ids
    assert "the ids are raw" in found[0][3] and "IntegerLookup" in found[0][4] and "input_dim=501" in found[0][4]


def test_unused_embedding_on_a_small_dataset_reads_the_id_range():
    """50,000 rows, 3,000 lookups of ids below 500: far fewer lookups than rows, caught by the range."""
    rows = [Row(index=0, kind="ids", path="m/items", layer_class="Embedding", input_dim=50000)]
    det = gradtrace.UnusedEmbedding()
    det.reset()
    ids = tf.constant(np.random.default_rng(0).integers(0, 500, 3000).astype("int32"))
    det.check(StatsView(Table(rows), tf.constant(matrix(rows)), step=tf.constant(0), ids={0: ids}))
    found = list(det.epoch_end(None))
    assert len(found) == 1 and "highest id seen in 3000 lookups this epoch is 499, but input_dim=50000" in found[0][3]
    assert "input_dim=500" in found[0][4]
    # ids spread over the whole table, even few of them: silent
    det = gradtrace.UnusedEmbedding()
    det.reset()
    ids = tf.constant(np.random.default_rng(1).integers(0, 50000, 300).astype("int32"))
    det.check(StatsView(Table(rows), tf.constant(matrix(rows)), step=tf.constant(0), ids={0: ids}))
    assert list(det.epoch_end(None)) == []


def test_embedding_collapse_reads_the_effective_rank_of_the_table():
    rng = np.random.default_rng(0)
    rank1 = np.outer(rng.normal(size=500), rng.normal(size=16))
    assert gradtrace.EmbeddingCollapse.effective_rank(rank1) == pytest.approx(1.0, abs=0.01)
    assert gradtrace.EmbeddingCollapse.effective_rank(rng.normal(size=(500, 16))) > 14.0

    class Ctx:  # what epoch_end reads of the run (a HostView): the Embedding layers by path, the step
        pass

    import keras

    layers = {1: keras.layers.Embedding(500, 16, name="flat"), 2: keras.layers.Embedding(500, 16, name="rich")}
    for k, layer in layers.items():
        layer.build((None,))
        layer.embeddings.assign((rank1 if k == 1 else rng.normal(size=(500, 16))).astype("float32"))
    Ctx.embedding_layers = staticmethod(lambda: [("m/flat", layers[1]), ("m/rich", layers[2])])
    Ctx.model = type("M", (), {"optimizer": keras.optimizers.SGD()})
    Ctx.current_step = staticmethod(lambda: int(Ctx.model.optimizer.iterations.numpy()))  # the run's step counter
    found = list(gradtrace.EmbeddingCollapse().epoch_end(Ctx))
    assert [f[0] for f in found] == ["m/flat"] and "span about 1 of its 16 dimensions" in found[0][3] and found[0][4]
    # a rank that keeps falling (16 -> 12 -> 8 -> 6 dimensions used), still above 10%: the trend fires
    det, basis = gradtrace.EmbeddingCollapse(every=100), rng.normal(size=(500, 16))
    layers[1].embeddings.assign(basis.astype("float32"))
    fired = []
    for k in (16, 12, 8, 6):
        layers[2].embeddings.assign((basis[:, :k] @ rng.normal(size=(k, 16))).astype("float32"))
        Ctx.model.optimizer.iterations.assign_add(100)
        fired.append([f[0] for f in det.periodic(Ctx)])
    assert fired == [[], [], [], ["m/rich"]] and det.history["m/rich"][0][0] == 100


def _cut_rows(norm_shape=(1, 8)):
    """inputs -> m/d1 -> m/bn (BatchNormalization) -> m/out (head) -> loss, with a custom layer m/c beside d1
    whose kernel has a weight row but no gradient row (the step never reads it)."""
    return [
        R(0, "output", "m/d1", 0, shape=(1, 8)), R(1, "output", "m/bn", 1, cls="BatchNormalization", shape=norm_shape),
        R(2, "output", "m/out", 2, shape=(1, 1), head=True), R(3, "loss", "loss", 3, cls="loss"),
        R(4, "gradient", "m/d1", 0), R(5, "gradient", "m/bn", 1), R(6, "gradient", "m/out", 2),
        R(7, "weight", "m/d1", 0, name="kernel"), R(8, "weight_gradient", "m/d1", 0, name="kernel"),
        R(9, "weight", "m/bn", 1, name="gamma"), R(10, "weight_gradient", "m/bn", 1, name="gamma"),
        R(11, "weight", "m/out", 2, name="kernel"), R(12, "weight_gradient", "m/out", 2, name="kernel"),
    ]


CUT_GRAPH = dict(depth={"m/d1": 2, "m/bn": 1, "m/out": 0}, downstream={"m/d1": {"m/bn", "m/out"}, "m/bn": {"m/out"},
                                                                        "m/out": set()},
                 order={"m/d1": 0, "m/bn": 1, "m/out": 2}, consumers={"m/d1": {"m/bn"}, "m/bn": {"m/out"}})


def test_gradient_cut_names_the_layer_above_that_passes_no_gradient():
    rows = _cut_rows()
    healthy = matrix(rows, mean={3: 0.7}, norm={4: 1.0, 5: 1.0, 6: 1.0, 8: 0.5, 10: 0.5, 12: 0.5})
    assert not run(gradtrace.GradientCut(), rows, healthy, steps=6, graph=LayerGraph(**CUT_GRAPH))[0].any()
    # every gradient zero is no_gradient's, not this one's
    assert not run(gradtrace.GradientCut(), rows, matrix(rows, mean={3: 0.7}), steps=6)[0].any()
    cut = matrix(rows, mean={3: 0.7}, norm={5: 1.0, 6: 1.0, 10: 0.5, 12: 0.5})  # d1 gets nothing, above it does
    fired, _, ex = run(gradtrace.GradientCut(patience=3), rows, cut, steps=4, graph=LayerGraph(**CUT_GRAPH))
    assert fired[:, 8].tolist() == [False, False, True, False] and fired.sum() == 1  # after 3 steps, once
    fired, _, ex = run(gradtrace.GradientCut(patience=3), rows, cut, steps=3, graph=LayerGraph(**CUT_GRAPH))
    assert ex[0][0].path == "m/d1" and "m/bn (BatchNormalization)" in ex[0][2] and "batch of 1 example" in ex[0][2]


def test_gradient_cut_names_the_op_on_the_way_and_a_weight_never_read():
    rows = _cut_rows()
    graph = LayerGraph(**CUT_GRAPH, cuts={("m/d1", "m/bn"): "Sign (m/binarize/Sign)"}, unreached=frozenset({"m/d1"}))
    cut = matrix(rows, mean={3: 0.7}, norm={5: 1.0, 6: 1.0, 10: 0.5, 12: 0.5})
    fired, _, ex = run(gradtrace.GradientCut(patience=1), rows, cut, graph=graph)
    assert fired[0][8] and "Sign (m/binarize/Sign)" in ex[0][2] and "m/bn" in ex[0][2]
    # a kernel with a weight row and no gradient row: the gradient is None, known at the first step
    rows = _cut_rows()[:11] + [R(11, "weight", "m/out", 2, name="kernel"), R(12, "weight", "m/out", 2, name="bias"),
                               R(13, "weight_gradient", "m/out", 2, name="bias")]
    m = matrix(rows, mean={3: 0.7}, norm={4: 1.0, 5: 1.0, 6: 1.0, 8: 0.5, 10: 0.5, 13: 0.5})
    fired, _, ex = run(gradtrace.GradientCut(), rows, m, steps=2, graph=LayerGraph(**CUT_GRAPH))
    assert fired[0][11] and not fired[1].any()  # once per fit
    fired, _, ex = run(gradtrace.GradientCut(), rows, m, graph=LayerGraph(**CUT_GRAPH))
    assert ex[0][0].path == "m/out" and "never reads kernel" in ex[0][2]


def test_identical_units_reads_the_kernel_columns_after_updates():
    import types

    import keras

    def ctx(*layers, iterations=8):
        model = types.SimpleNamespace(optimizer=types.SimpleNamespace(iterations=tf.Variable(iterations)))
        tap = types.SimpleNamespace(layers={i: l for i, l in enumerate(layers)},
                                    paths={i: f"m/{l.name}" for i, l in enumerate(layers)})
        return types.SimpleNamespace(model=model, tap=tap)  # what a HostView gives the hook

    same = keras.layers.Dense(4, kernel_initializer=keras.initializers.Constant(0.1), name="same")
    same.build((None, 3))
    random = keras.layers.Dense(4, name="random")
    random.build((None, 3))
    one = keras.layers.Dense(1, kernel_initializer="zeros", name="one")
    one.build((None, 3))
    found = list(gradtrace.IdenticalUnits().epoch_end(ctx(same, random, one)))
    assert [f[0] for f in found] == ["m/same"] and "Constant(value=0.1)" in found[0][3] and found[0][4]
    assert list(gradtrace.IdenticalUnits().epoch_end(ctx(same, iterations=0))) == []  # not yet trained
    same.bias.assign([0.0, 0.0, 0.1, 0.0])  # biases that differ make the units differ
    assert list(gradtrace.IdenticalUnits().epoch_end(ctx(same))) == []


def test_no_progress_compares_the_running_loss_with_its_start_and_with_chance():
    rows = [R(0, "target", "targets", 0, cls=""), R(1, "output", "m/out", 1, shape=(32, 4), head=True),
            R(2, "loss", "loss", 2, cls="loss", loss_kind="sparse_categorical_crossentropy"),
            R(3, "weight_gradient", "m/out", 1, name="kernel")]
    examples = tf.constant(32.0)
    det = gradtrace.NoProgress(window=640, min_steps=60)
    # at chance (log 4) throughout: fires once, when both the window and the steps are reached
    stuck = matrix(rows, mean={2: float(np.log(4.0))}, norm={3: 1.0})
    fired, values, ex = run(det, rows, stuck, steps=60, examples=examples)
    assert fired[:, 2].sum() == 1 and fired[59, 2] and values[2] == pytest.approx(1.0, rel=1e-3)
    assert "class prior" in ex[0][2]
    assert not det.check(StatsView(Table(rows), tf.constant(stuck), step=tf.constant(60, tf.int64),
                                   examples=examples))[0].numpy().any()  # once per fit
    # learning: the loss falls below chance by 6% in 60 steps: silent
    det = gradtrace.NoProgress(window=640, min_steps=60)
    table = Table(rows)
    fired_any = False
    for s in range(120):
        m = matrix(rows, mean={2: float(np.log(4.0)) * (1.0 - 0.001 * s)}, norm={3: 1.0})
        f, _ = det.check(StatsView(table, tf.constant(m), step=tf.constant(s, tf.int64), examples=examples))
        fired_any |= bool(np.asarray(f).any())
    assert not fired_any
    # a regression stuck at the targets' variance (it predicts their mean): fires
    rows_r = [R(0, "target", "targets", 0, cls=""), R(1, "output", "m/out", 1, shape=(32, 1), head=True),
              R(2, "loss", "loss", 2, cls="loss", loss_kind="regression"),
              R(3, "weight_gradient", "m/out", 1, name="kernel")]
    # targets of mean 50 and variance 4: E[y^2] = 2504, the norm of 100 of them sqrt(250400)
    at_mean = matrix(rows_r, mean={0: 50.0, 2: 4.0}, norm={0: float(np.sqrt(250400.0)), 3: 1.0})
    fired, _, ex = run(gradtrace.NoProgress(window=640, min_steps=60), rows_r, at_mean, steps=60, examples=examples)
    assert fired[59, 2] and "targets' mean" in ex[0][2]
    # from the variance down to half of it: learning
    det, table = gradtrace.NoProgress(window=640, min_steps=60), Table(rows_r)
    for s in range(70):
        m = matrix(rows_r, mean={0: 50.0, 2: 4.0 if s < 10 else 2.0}, norm={0: float(np.sqrt(250400.0)), 3: 1.0})
        f, _ = det.check(StatsView(table, tf.constant(m), step=tf.constant(s, tf.int64), examples=examples))
        assert not np.asarray(f).any()


def test_penalties_weighs_the_regularisers_against_the_epoch_loss():
    import types

    import keras

    layer = keras.layers.Dense(4, kernel_regularizer=keras.regularizers.L2(1.0), name="d")
    layer.build((None, 8))
    tap = types.SimpleNamespace(layers={0: layer}, paths={0: "m/d"})
    ctx = types.SimpleNamespace(tap=tap, epoch_logs={})
    det = gradtrace.Penalties()
    det.reset()
    det.epoch_begin(ctx)
    penalty = float(layer.kernel_regularizer(layer.kernel))
    layer.kernel.assign(layer.kernel * 0.5)  # the weights shrank to half
    ctx.epoch_logs = {"loss": penalty / 4 * 1.5}  # the penalty (now a quarter of it) is 2/3 of the loss
    found = list(det.epoch_end(ctx))
    assert [f[0] for f in found] == ["m/d"] and "L2(l2=1)" in found[0][3] and "50%" in found[0][3]
    assert list(det.epoch_end(ctx)) == []  # once per fit
    det.reset()
    det.epoch_begin(ctx)
    ctx.epoch_logs = {"loss": penalty * 10}  # the data dominates
    layer.kernel.assign(layer.kernel * 0.5)
    assert list(det.epoch_end(ctx)) == []


def test_update_size_measures_each_layers_update_against_its_weights():
    import types

    import keras

    dense = keras.layers.Dense(64, name="d")
    dense.build((None, 64))
    out = keras.layers.Dense(4, name="out")
    out.build((None, 64))
    optimizer = keras.optimizers.SGD(learning_rate=1e-5)
    optimizer.build(dense.trainable_weights + out.trainable_weights)
    step = {"now": 0}
    tap = types.SimpleNamespace(layers={0: dense, 1: out}, paths={0: "m/d", 1: "m/out"})
    ctx = types.SimpleNamespace(optimizers=[optimizer], tap=tap, current_step=lambda: step["now"])

    def move(by, layers=(dense, out)):  # every kernel moves by ``by`` of its size per step, over 10 steps
        for layer in layers:
            k = layer.kernel.numpy()
            layer.kernel.assign(k + 10 * by * np.linalg.norm(k) / np.sqrt(k.size) * np.sign(k))
        step["now"] += 10
        return list(det.periodic(ctx))

    # too small: from an optimizer's first update, every layer moves by 1e-6 per step: fires at the 2nd check
    det = gradtrace.UpdateSize()
    det.epoch_begin(ctx)
    assert move(1e-6) == []
    found = move(1e-6)
    assert [f[0] for f in found] == ["learning rate"] and f"{1e-5:.3g}" in found[0][3] and "1e-06" in found[0][3]
    assert found[0][4].startswith("raise the learning rate, to about 0.01")
    assert move(1e-6) == []  # once per fit
    # a healthy 1e-3 on one layer is enough to stay silent; so is a learning rate that is warming up
    det = gradtrace.UpdateSize()
    det.epoch_begin(ctx)
    assert move(1e-6, (out,)) + move(1e-3, (dense,)) + move(1e-6, (out,)) + move(1e-3, (dense,)) == []
    det = gradtrace.UpdateSize()
    det.epoch_begin(ctx)
    optimizer.learning_rate.assign(2e-5)
    assert move(1e-6) + move(1e-6) == []
    optimizer.learning_rate.assign(1e-5)
    # not from the start of training (the optimizer had made updates): a converged model is left alone
    det = gradtrace.UpdateSize()
    step["now"] = 100
    det.epoch_begin(ctx)
    assert move(1e-6) + move(1e-6) == []
    # too large: one layer rewritten at every step, at two checks in a row
    det = gradtrace.UpdateSize()
    det.epoch_begin(ctx)
    assert move(2.0, (dense,)) == []
    found = move(2.0, (dense,))
    assert [f[0] for f in found] == ["m/d"] and "lower the learning rate" in found[0][4]
    with pytest.raises(ValueError, match="low=0.1 must be below high=0.01"):
        gradtrace.UpdateSize(low=0.1, high=0.01)
