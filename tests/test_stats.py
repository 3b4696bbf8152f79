"""gradtrace.stats against plain NumPy formulas, eagerly and inside a tf.function.

Every expected value is computed here from the tensor with NumPy (in float64);
nothing is pasted from a previous run.
"""

import numpy as np
import pytest
import tensorflow as tf

from gradtrace import stats as st

MODES = ("eager", "graph")

# float32 one-pass statistics on well-conditioned data (|mean| about std):
# a few ulps of the sum of squares, relative to the largest term.
RTOL = 1e-5
ATOL = 1e-5


def run(mode, fn, *args, input_signature=None):
    """Call ``fn(*args)`` eagerly or traced (optionally with a relaxed signature)."""
    if mode == "graph":
        fn = tf.function(fn, input_signature=input_signature)
    out = fn(*[tf.convert_to_tensor(a) for a in args])
    return tf.nest.map_structure(lambda t: t.numpy(), out)


# -- NumPy reference formulas -------------------------------------------------------
def np_float_stats(a, relu=False):
    a = np.asarray(a, dtype=np.float64)
    n = a.size
    if n:
        mean = a.sum() / n
        ref = {
            "mean": mean,
            "std": np.sqrt(np.mean((a - mean) ** 2)),
            "min": a.min(),
            "max": a.max(),
            "zero_frac": np.count_nonzero(a == 0) / n,
        }
    else:
        ref = {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0, "zero_frac": 0.0}
    ref["norm"] = np.sqrt(np.sum(a * a))
    ref["size"] = float(n)
    if relu and a.ndim >= 2 and n:
        units = a.reshape(-1, a.shape[-1])  # every example and position, per unit
        ref["dead_frac"] = np.mean(np.all(units == 0, axis=0))
    return ref


def np_ids_stats(ids, input_dim):
    flat = np.asarray(ids, dtype=np.int64).ravel()
    bad = (flat < 0) | (flat >= input_dim)
    where_bad = np.flatnonzero(bad)
    return {
        "min": float(flat.min()) if flat.size else 0.0,
        "max": float(flat.max()) if flat.size else 0.0,
        "size": float(flat.size),
        "bad": float(bad.sum()),
        "bad_value": float(flat[where_bad[0]]) if where_bad.size else 0.0,
        "bad_index": float(where_bad[0]) if where_bad.size else -1.0,
    }


def assert_stats_close(got, ref, keys=None):
    for k in keys or ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=RTOL, atol=ATOL, err_msg=k)


# -- known tensors ------------------------------------------------------------------
def _rng():
    return np.random.default_rng(1234)


def _relu_with_dead_units():
    """ReLU-like activations [batch, time, units] where units 1 and 3 are dead."""
    a = np.maximum(_rng().normal(size=(6, 3, 5)), 0.0).astype(np.float32)
    a[..., 1] = 0.0
    a[..., 3] = 0.0
    a[0, 0, 4] = 2.5  # unit 4 alive even if the draw made it all zero
    return a


FLOAT_CASES = {
    "normal_3d": lambda: _rng().normal(size=(3, 4, 5)).astype(np.float32),
    "shifted_2d": lambda: (_rng().normal(size=(7, 3)) * 2.0 + 1.5).astype(np.float32),
    "scalar": lambda: np.float32(-3.25),
    "vector_with_zeros": lambda: np.array([0.0, 1.0, -2.0, 0.0, 4.0], np.float32),
    "relu_dead_units": _relu_with_dead_units,
    "float64": lambda: _rng().normal(size=(4, 6)),
    "float16": lambda: _rng().normal(size=(4, 6)).astype(np.float16),
    "all_zero": lambda: np.zeros((2, 3), np.float32),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(FLOAT_CASES))
def test_float_stats_match_numpy(mode, case):
    a = FLOAT_CASES[case]()
    got = run(mode, lambda t: st.float_stats(t, relu=False), a)
    ref = np_float_stats(a)
    assert_stats_close(got, ref)
    assert "dead_frac" not in got  # only computed for ReLU-family outputs
    # the sums pack() uses to decide whether to count NaN/Inf
    np.testing.assert_allclose(got["_s"], np.sum(np.asarray(a, np.float64)), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got["_ss"], np.sum(np.asarray(a, np.float64) ** 2), rtol=RTOL, atol=ATOL)
    for k, v in got.items():
        assert v.dtype == np.float32, k
        assert v.shape == (), k


@pytest.mark.parametrize("mode", MODES)
def test_dead_frac_counts_units_dead_for_every_example_and_position(mode):
    a = _relu_with_dead_units()
    got = run(mode, lambda t: st.float_stats(t, relu=True), a)
    ref = np_float_stats(a, relu=True)
    assert_stats_close(got, ref)
    # units 1 and 3 were zeroed everywhere; the draw may have killed another one
    assert ref["dead_frac"] >= 2 / 5
    np.testing.assert_allclose(got["dead_frac"], ref["dead_frac"], rtol=0, atol=1e-7)


@pytest.mark.parametrize("mode", MODES)
def test_dead_frac_is_per_unit_not_per_element(mode):
    # Unit 0 is zero for every example except one, so it is alive; unit 2 is
    # zero everywhere, so it is dead. Half the elements are zero, but only one
    # unit in three is dead.
    a = np.array(
        [
            [0.0, 1.0, 0.0],
            [0.0, 2.0, 0.0],
            [5.0, 0.5, 0.0],
            [0.0, 3.0, 0.0],
        ],
        np.float32,
    )
    got = run(mode, lambda t: st.float_stats(t, relu=True), a)
    ref = np_float_stats(a, relu=True)
    assert ref["dead_frac"] == pytest.approx(1 / 3)
    assert ref["zero_frac"] == pytest.approx(7 / 12)
    np.testing.assert_allclose(got["dead_frac"], ref["dead_frac"], rtol=1e-6)
    np.testing.assert_allclose(got["zero_frac"], ref["zero_frac"], rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_dead_frac_ignores_sign_of_units(mode):
    # A unit of negative values is not dead (dead means exactly zero).
    a = np.array([[-1.0, 0.0], [-2.0, 0.0]], np.float32)
    got = run(mode, lambda t: st.float_stats(t, relu=True), a)
    np.testing.assert_allclose(got["dead_frac"], np_float_stats(a, relu=True)["dead_frac"])
    assert got["dead_frac"] == pytest.approx(0.5)


def test_dead_frac_needs_a_unit_axis():
    # A rank-1 tensor has no batch axis to be dead across.
    got = run("eager", lambda t: st.float_stats(t, relu=True), np.array([0.0, 1.0], np.float32))
    assert "dead_frac" not in got


def test_float_stats_in_graph_with_unknown_batch_and_time():
    a = _relu_with_dead_units()
    spec = [tf.TensorSpec([None, None, a.shape[-1]], tf.float32)]
    got = run("graph", lambda t: st.float_stats(t, relu=True), a, input_signature=spec)
    assert_stats_close(got, np_float_stats(a, relu=True))
    # the same traced function on a different batch
    b = np.maximum(_rng().normal(size=(2, 7, a.shape[-1])), 0).astype(np.float32)
    b[..., 0] = 0
    f = tf.function(lambda t: st.float_stats(t, relu=True), input_signature=spec)
    got_b = {k: v.numpy() for k, v in f(tf.constant(b)).items()}
    assert_stats_close(got_b, np_float_stats(b, relu=True))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "shape",
    [
        (0,),
        (0, 3),
        (4, 0),
        (2, 0, 5),
    ],
)
def test_float_stats_of_empty_tensor_are_zero_and_finite(mode, shape):
    a = np.zeros(shape, np.float32)
    got = run(mode, lambda t: st.float_stats(t, relu=True), a)
    ref = np_float_stats(a)
    assert_stats_close(got, ref, keys=["mean", "std", "min", "max", "norm", "zero_frac", "size"])
    # no +inf/-inf leaking from reduce_min/reduce_max of nothing, and no 0/0
    for k, v in got.items():
        assert np.isfinite(v), (k, v)
    if "dead_frac" in got:
        assert 0.0 <= got["dead_frac"] <= 1.0


def test_std_of_offset_tensor_matches_numpy():
    a = (1000.0 + 0.01 * _rng().normal(size=1000)).astype(np.float32)
    got = run("eager", lambda t: st.float_stats(t), a)
    ref = np_float_stats(a)
    # float32 can represent this std to ~1e-3 relative; allow 10%.
    np.testing.assert_allclose(got["std"], ref["std"], rtol=0.1)


# -- ids_stats ----------------------------------------------------------------------
IDS_CASES = {
    "one_too_large": (np.array([[3, 0], [7, 12]], np.int32), 10),
    "negative_first": (np.array([[-1, 2], [11, 4]], np.int64), 10),
    "boundary": (np.array([0, 9, 10, 9], np.int32), 10),  # 9 is the last valid id, 10 is not
    "all_good": (np.array([[1, 2, 3], [4, 5, 0]], np.int32), 6),
    "three_d_late_bad": (np.arange(24, dtype=np.int32).reshape(2, 3, 4), 20),
    "single": (np.array([5], np.int64), 100),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(IDS_CASES))
def test_ids_stats_match_numpy(mode, case):
    ids, dim = IDS_CASES[case]
    got = run(mode, lambda t: st.ids_stats(t, dim), ids)
    ref = np_ids_stats(ids, dim)
    assert set(got) == set(ref)
    for k in ref:
        assert got[k] == ref[k], (k, got[k], ref[k])
        assert got[k].dtype == np.float32


def test_ids_stats_reference_values():
    # Spelled out once, so the NumPy reference itself is pinned down.
    assert np_ids_stats(*IDS_CASES["one_too_large"]) == {
        "min": 0.0, "max": 12.0, "size": 4.0, "bad": 1.0, "bad_value": 12.0, "bad_index": 3.0,
    }
    assert np_ids_stats(*IDS_CASES["negative_first"])["bad_index"] == 0.0
    assert np_ids_stats(*IDS_CASES["negative_first"])["bad"] == 2.0
    assert np_ids_stats(*IDS_CASES["all_good"])["bad_index"] == -1.0
    assert np_ids_stats(*IDS_CASES["three_d_late_bad"])["bad_index"] == 20.0


def test_ids_stats_in_graph_with_unknown_shape():
    spec = [tf.TensorSpec([None, None], tf.int32)]
    f = tf.function(lambda t: st.ids_stats(t, 10), input_signature=spec)
    for ids in (np.array([[1, 2], [3, 4]], np.int32), np.array([[1, 2, 3, 4, 5, -7, 10]], np.int32)):
        got = {k: v.numpy() for k, v in f(tf.constant(ids)).items()}
        assert got == np_ids_stats(ids, 10)


@pytest.mark.parametrize("mode", MODES)
def test_ids_stats_of_empty_ids(mode):
    ids = np.zeros((4, 0), np.int32)
    got = run(mode, lambda t: st.ids_stats(t, 10), ids)
    assert got == np_ids_stats(ids, 10)


@pytest.mark.parametrize("shapes", ["static", "unknown"])
def test_ids_block_of_every_lookup_at_once_matches_each_alone(shapes):
    # every case side by side in one block (as a step reduces all its lookups together), with an empty one
    cases = [IDS_CASES[k] for k in sorted(IDS_CASES)] + [(np.zeros((4, 0), np.int32), 10)]
    if shapes == "static":
        got = st.ids_block([(tf.constant(ids), dim) for ids, dim in cases]).numpy()
    else:
        specs = [tf.TensorSpec([None] * ids.ndim, ids.dtype) for ids, _ in cases]
        f = tf.function(lambda *t: st.ids_block([(x, dim) for x, (_, dim) in zip(t, cases)]), input_signature=specs)
        got = f(*[tf.constant(ids) for ids, _ in cases]).numpy()
    assert got.shape == (len(cases), len(st.BASE))
    for row, (ids, dim) in zip(got, cases):
        ref = np_ids_stats(ids, dim)
        assert {k: float(row[st.BASE.index(k)]) for k in ref} == ref
        assert row[st.BASE.index("s")] == 0.0


# -- Collector: many rows at once, packed into one matrix ---------------------------
def _pack(entries, lr=None):
    """Build ``[(tensor, counted)]`` rows with a Collector and return the full matrix."""
    c = st.Collector()
    for t, counted in entries:
        c.add("output", "r", t, counted=counted)
    return c.build(lr=lr)[1]


def _pack_rows(mode, arrays, relu=False, counted=True):
    """Every statistic of ``arrays`` as Collector rows, eagerly or in a tf.function."""

    def fn(*ts):
        c = st.Collector()
        for t in ts:
            c.add("output", "r", t, counted=t if counted else None, relu=relu)
        return c.build()[1]

    return run(mode, fn, *arrays)


def _np_counts(a):
    a = np.asarray(a)
    return float(np.isnan(a).sum()), float(np.isinf(a).sum())


def test_columns_are_unique_and_indexed():
    assert len(set(st.COLUMNS)) == len(st.COLUMNS)
    assert [st.COL[c] for c in st.COLUMNS] == list(range(len(st.COLUMNS)))


@pytest.mark.parametrize("mode", MODES)
def test_pack_finite_rows_match_numpy_and_counts_are_zero(mode):
    arrays = [FLOAT_CASES[c]().astype(np.float32) for c in ("normal_3d", "shifted_2d", "vector_with_zeros")]
    arrays.append(_relu_with_dead_units())
    m = _pack_rows(mode, arrays, relu=True)
    assert m.shape == (len(arrays), len(st.COLUMNS))
    assert m.dtype == np.float32
    for i, a in enumerate(arrays):
        ref = np_float_stats(a, relu=True)
        for k, v in ref.items():
            np.testing.assert_allclose(m[i, st.COL[k]], v, rtol=RTOL, atol=ATOL, err_msg=f"row {i} {k}")
        for k in ("nan", "inf", "update_ratio", "bad", "bad_value", "bad_index"):
            assert m[i, st.COL[k]] == 0.0, (i, k)
        if "dead_frac" not in ref:
            assert m[i, st.COL["dead_frac"]] == 0.0
    # the ReLU row really has dead units, so the column is not trivially 0
    assert m[3, st.COL["dead_frac"]] >= 2 / 5 - 1e-7


@pytest.mark.parametrize("mode", MODES)
def test_pack_counts_nan_and_inf_per_row(mode):
    finite = _rng().normal(size=(3, 4)).astype(np.float32)
    nans = finite.copy()
    nans[0, 1] = nans[2, 3] = np.nan
    infs = finite.copy()
    infs[1, 0] = np.inf
    infs[1, 1] = infs[2, 2] = -np.inf  # +inf and -inf: the sum is NaN, the count is 3
    both = finite.copy()
    both[0, 0] = np.nan
    both[0, 1] = np.inf
    arrays = [finite, nans, infs, both, np.zeros((0, 4), np.float32)]
    m = _pack_rows(mode, arrays)
    for i, a in enumerate(arrays):
        n_nan, n_inf = _np_counts(a)
        assert m[i, st.COL["nan"]] == n_nan, i
        assert m[i, st.COL["inf"]] == n_inf, i
        assert m[i, st.COL["size"]] == a.size
    # the data really had NaN/Inf in rows 1-3 and none in rows 0 and 4
    assert [bool(m[i, st.COL["nan"]] + m[i, st.COL["inf"]]) for i in range(5)] == [False, True, True, True, False]


@pytest.mark.parametrize("mode", MODES)
def test_pack_counts_zero_for_finite_values_whose_square_overflows(mode):
    # Finite float32 values whose sum of squares overflows: the counting branch
    # runs, but there is nothing non-finite to count.
    big = np.array([3e19, -3e19, 1.0], np.float32)
    small = np.ones((2, 2), np.float32)
    m = _pack_rows(mode, [big, small])
    assert np.all(np.isfinite(big))
    assert np.float64(big[0]) ** 2 > np.finfo(np.float32).max  # the squares do overflow in float32
    assert m[:, st.COL["nan"]].tolist() == [0.0, 0.0]
    assert m[:, st.COL["inf"]].tolist() == [0.0, 0.0]
    np.testing.assert_allclose(m[0, st.COL["max"]], 3e19, rtol=1e-6)
    np.testing.assert_allclose(m[0, st.COL["min"]], -3e19, rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_cheap_matrix_flags_nonfinite_rows_and_full_matrix_counts_them(mode):
    # With only some statistics (an ordinary step), nan/inf are 0/1 flags read off each
    # row's own sum, at no extra pass; with every statistic (a reported step) they are
    # exact counts of the counted tensor.
    finite = np.ones((2, 3), np.float32)
    with_nans = finite.copy()
    with_nans[1, :2] = np.nan
    with_infs = finite.copy()
    with_infs[0, :3] = np.inf
    huge = np.array([3e38, 3e38, -3e38], np.float32)  # finite, but its sum overflows

    def fn(a, b, c, d):
        c_ = st.Collector()
        for t in (a, b, c, d):
            c_.add("output", "r", t)
        _, cheap, full = c_.build(needs=st.base_needs(["nan", "inf"]))
        return tf.stack([cheap, full()])

    cheap, full = run(mode, fn, finite, with_nans, with_infs, huge)
    assert cheap[:, st.COL["nan"]].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert cheap[:, st.COL["inf"]].tolist() == [0.0, 0.0, 1.0, 1.0]  # the overflowed sum is flagged ...
    assert full[:, st.COL["nan"]].tolist() == [0.0, 2.0, 0.0, 0.0]
    assert full[:, st.COL["inf"]].tolist() == [0.0, 0.0, 3.0, 0.0]  # ... and the exact count clears it


@pytest.mark.parametrize("mode", MODES)
def test_pack_row_without_counted_tensor_has_zero_counts(mode):
    bad = np.array([np.nan, 1.0, np.inf], np.float32)

    def fn(t):
        return _pack([(t, None), (t, t)])

    m = run(mode, fn, bad)
    assert m[0, st.COL["nan"]] == 0.0 and m[0, st.COL["inf"]] == 0.0
    assert (m[1, st.COL["nan"]], m[1, st.COL["inf"]]) == _np_counts(bad) == (1.0, 1.0)


@pytest.mark.parametrize("mode", MODES)
def test_pack_empty_tensors_give_zero_rows(mode):
    arrays = [np.zeros((0,), np.float32), np.zeros((0, 3), np.float32), np.zeros((0, 2, 4), np.float32)]
    m = _pack_rows(mode, arrays, relu=True)
    assert m.shape == (3, len(st.COLUMNS))
    assert np.all(np.isfinite(m))
    for k in ("mean", "std", "min", "max", "norm", "nan", "inf", "zero_frac", "size"):
        assert m[:, st.COL[k]].tolist() == [0.0, 0.0, 0.0], k


@pytest.mark.parametrize("mode", MODES)
def test_pack_empty_tensor_next_to_nonfinite_one(mode):
    # The counting branch runs (row 1 has a NaN); the empty row still counts 0.
    arrays = [np.zeros((0, 3), np.float32), np.array([[np.nan, 2.0]], np.float32)]
    m = _pack_rows(mode, arrays)
    assert m[0].tolist() == [0.0] * len(st.COLUMNS)
    assert m[1, st.COL["nan"]] == 1.0


def test_pack_of_nothing():
    m = st.Collector().build()[1].numpy()
    assert m.shape == (0, len(st.COLUMNS))
    assert m.dtype == np.float32


@pytest.mark.parametrize("mode", MODES)
def test_pack_mixes_float_ids_and_update_ratio_rows(mode):
    acts = _rng().normal(size=(4, 3)).astype(np.float32)
    ids = np.array([[2, 15], [-3, 1]], np.int32)
    dim = 10
    lr = 0.5

    def fn(a, i):
        c = st.Collector()
        c.add("output", "a", a)
        c.add("ids", "e", values=st.ids_stats(i, dim), counted=None)
        g = c.add("weight_gradient", "d", a)
        c.ratio(g, c.add("weight", "d", 2.0 * a))
        return c.build(lr=tf.constant(lr))[1]

    m = run(mode, fn, acts, ids)
    assert m.shape == (4, len(st.COLUMNS))
    ref_f = np_float_stats(acts)
    for k, v in ref_f.items():
        np.testing.assert_allclose(m[0, st.COL[k]], v, rtol=RTOL, atol=ATOL, err_msg=k)
    assert m[0, st.COL["update_ratio"]] == 0.0
    ref_i = np_ids_stats(ids, dim)
    for k, v in ref_i.items():
        assert m[1, st.COL[k]] == v, k
    for k in ("mean", "std", "norm", "nan", "inf", "zero_frac", "dead_frac", "update_ratio"):
        assert m[1, st.COL[k]] == 0.0, k
    # |g| / |2g| = 1/2, times lr
    np.testing.assert_allclose(m[2, st.COL["update_ratio"]], lr * 0.5, rtol=1e-6)
    assert ref_i["bad"] == 2.0 and ref_i["bad_value"] == 15.0 and ref_i["bad_index"] == 1.0


def test_row_dict_reads_columns_by_name():
    row = np.arange(len(st.COLUMNS), dtype=np.float32)
    d = st.row_dict(row)
    assert list(d) == list(st.COLUMNS)
    assert all(d[c] == float(st.COL[c]) for c in st.COLUMNS)


@pytest.mark.parametrize("mode", MODES)
def test_collector_computes_only_the_needed_columns_until_asked_for_all(mode):
    a = _relu_with_dead_units()

    def fn(t):
        c = st.Collector()
        c.add("output", "r", t, relu=True)
        needs = st.base_needs(["dead_frac"])
        _, cheap, full = c.build(needs=needs)
        return tf.stack([cheap, full()])

    cheap, full = run(mode, fn, a)
    ref = np_float_stats(a, relu=True)
    # always: the sum (for the NaN/Inf flags) and the size; plus what was asked for
    for k in ("mean", "size", "dead_frac"):
        np.testing.assert_allclose(cheap[0, st.COL[k]], ref[k], rtol=RTOL, atol=ATOL, err_msg=k)
    for k in ("max", "std", "norm"):
        assert cheap[0, st.COL[k]] == 0.0, k  # not computed
    for k, v in ref.items():
        np.testing.assert_allclose(full[0, st.COL[k]], v, rtol=RTOL, atol=ATOL, err_msg=k)


# -- derived rows: the same values are measured once -------------------------------------
def test_rows_holding_the_same_values_are_derived_from_one_and_equal_numpy():
    a = FLOAT_CASES["normal_3d"]().astype(np.float32)
    got = {}

    @tf.function
    def fn(t):
        c = st.Collector()
        c.add("output", "src", t)
        c.add("output", "flatten", tf.reshape(t, [-1]))
        c.add("output", "permute", tf.transpose(t, [0, 2, 1]))
        c.add("output", "same", t)  # a nested model's output is its last layer's tensor
        c.add("output", "chain", tf.expand_dims(tf.identity(tf.reshape(t, [-1])), 0))
        c.add("output", "doubled", 2.0 * t)  # other values: computed
        c.add("output", "relu", tf.nn.relu(t), relu=True)  # per-unit statistics: computed
        _, matrix, _ = c.build()
        got["derived"] = dict(c.derived)
        return matrix

    m = fn(tf.constant(a)).numpy()
    assert got["derived"] == {1: 0, 2: 0, 3: 0, 4: 0}
    tensors = [a, a.ravel(), a.transpose(0, 2, 1), a, a.ravel()[None], 2 * a, np.maximum(a, 0)]
    for i, t in enumerate(tensors):
        ref = np_float_stats(t, relu=i == 6)
        for k, v in ref.items():
            np.testing.assert_allclose(m[i, st.COL[k]], v, rtol=RTOL, atol=ATOL, err_msg=f"row {i} {k}")
    for i in got["derived"]:
        assert (m[i] == m[0]).all(), i  # exactly the source row's values
    assert m[6, st.COL["dead_frac"]] == 0.0 and (m[6] != m[0]).any()


def test_a_traced_step_derives_flatten_permute_and_nested_outputs_and_reports_them():
    import keras
    from keras import layers

    import gradtrace

    class NeedsAll(gradtrace.Detector):
        name = "needs_all"
        needs = ("mean", "std", "min", "max", "norm", "zero_frac")

        def check(self, view):
            return view.mask(kinds=("output",)) & False, view["mean"]

    seq = keras.Input((4, 3))
    h = layers.Permute((2, 1), name="permute")(layers.Dense(4, name="proj")(seq))
    inner = keras.Model(seq, layers.Flatten(name="flat")(h), name="inner")
    x_in = keras.Input((4, 3))
    z = layers.Activation("linear", name="linear")(layers.Dropout(0.0, name="drop")(inner(x_in)))
    model = keras.Model(x_in, layers.Dense(1, name="out")(z), name="outer")
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 4, 3)).astype("float32"), rng.normal(size=(16, 1)).astype("float32")
    ref = gradtrace.capture(model, x, y)  # eager, every tensor by path; lr 0: the fit's step sees the same
    h = gradtrace.fit(model, x, y, batch_size=16, epochs=1, verbose=0, shuffle=False,
                      detectors=["nan", NeedsAll()])
    run = h.gradtrace
    table, matrix = run.engine.variants[gradtrace.step.TRACED].table, run.last_stats.numpy()
    derived = {(table.rows[i].kind, table.rows[i].path): table.rows[j].path for i, j in table.derived.items()}
    # Permute, Flatten, the inner model's output, Dropout(0) and linear: all the projection's values,
    # measured once (chains resolve to the row that is computed)
    for path in ("outer/inner/permute", "outer/inner/flat", "outer/inner", "outer/drop", "outer/linear"):
        assert derived[("output", path)] == "outer/inner/proj", derived
    assert ("output", "outer/out") not in derived and ("output", "outer/inner/proj") not in derived
    for r in table.rows:
        if r.kind in ("output", "gradient") and r.path in ref.outputs:
            t = (ref.outputs if r.kind == "output" else ref.gradients)[r.path].numpy()
            for k, v in np_float_stats(t).items():
                np.testing.assert_allclose(matrix[r.index, st.COL[k]], v, rtol=RTOL, atol=ATOL,
                                           err_msg=f"{r.kind} {r.path} {k}")
    from gradtrace.reporting import layer_table

    assert "derived: = outer/inner/proj" in layer_table(table, matrix)
