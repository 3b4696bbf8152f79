"""Pictures of a run: the bounded per-layer history, gradtrace.plot (history and snapshot) and the
self-contained HTML report."""

import html.parser
import sys

import numpy as np
import pytest

import gradtrace
from gradtrace.history import LayerHistory
from tests import models as M

pytest.importorskip("matplotlib", reason="the pictures need matplotlib (in the test extras)")


def test_history_stays_bounded_and_merged_buckets_are_exact():
    rng = np.random.default_rng(0)
    steps = 10_000
    values = rng.lognormal(size=(steps, 3))
    values[rng.random((steps, 3)) < 0.05] = np.nan  # not measured at some steps
    h = LayerHistory(max_buckets=64)
    keys = [("m/a", "gradient_norm"), ("m/b", "gradient_norm"), ("m/a", "dead_fraction")]
    for s in range(steps):
        h.add(s, s // 1000, dict(zip(keys, values[s])))
    assert len(h.count) <= 64 and h.count.sum() == steps and h.nbytes < 50_000
    assert h.width == 256 and (h.steps[1:, 0] == h.steps[:-1, 1] + 1).all()
    paths, mean = h.series("gradient_norm")
    _, low = h.series("gradient_norm", "min")
    _, high = h.series("gradient_norm", "max")
    assert paths == ["m/a", "m/b"]
    for b, (first, last) in enumerate(h.steps):
        block = values[first:last + 1, :2]
        np.testing.assert_allclose(mean[b], np.nanmean(block, axis=0), rtol=1e-12)
        np.testing.assert_array_equal(low[b], np.nanmin(block, axis=0))
        np.testing.assert_array_equal(high[b], np.nanmax(block, axis=0))
    assert tuple(h.epochs[-1]) == (9, 9)


def test_history_saves_without_pickle_and_loads_back(tmp_path):
    h = LayerHistory(max_buckets=4)
    for s in range(11):
        h.add(s, 0, {("m/a", "gradient_norm"): float(s)})
    h.save(str(tmp_path / "run"))
    back = LayerHistory.load(str(tmp_path / "run.json"))
    assert back.keys == h.keys and back.width == h.width
    np.testing.assert_array_equal(back.series("gradient_norm")[1], h.series("gradient_norm")[1])
    with pytest.raises(FileNotFoundError, match="save_report"):
        LayerHistory.load(str(tmp_path / "nothing"))


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    """Two epochs of the nested two-embedding model whose ``faulty`` layer makes NaN at step 12: the
    snapshot action holds that step, snapshots it and redoes it."""
    model = M.two_embedding_with_fault(at=12)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    x, y = M.two_embedding_data(n=32 * 10)
    snaps = tmp_path_factory.mktemp("snaps")
    h = gradtrace.fit(model, x, y, batch_size=32, epochs=2, shuffle=False, verbose=0,
                      on_anomaly="snapshot", snapshot_dir=snaps)
    return h


def test_plot_has_one_row_per_layer_in_execution_order_and_marks_the_anomaly(faulty_run):
    h = faulty_run
    a = h.anomalies[0]
    assert (a.detector, a.layer, a.step) == ("nan", "outer/inner/faulty", 12)
    fig = gradtrace.plot(h, what=("gradient_flow", "dead"))
    ax = fig.axes[0]
    image = next(i for i in ax.images if i.get_gid() == "panel:gradient_flow")
    rows = [r.path for r in h.gradtrace.engine.tables[True].rows if r.kind == "gradient"]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [p.split("/", 1)[1] for p in dict.fromkeys(rows)]  # execution order, model name dropped
    assert image.get_array().shape == (len(labels), len(h.gradtrace.history.count))
    marks = next(c for c in ax.collections if c.get_gid() == "anomalies")
    x, y = marks.get_offsets()[0]
    assert labels[int(y)] == "inner/faulty" and h.gradtrace.history.steps[int(x), 0] <= 12
    assert any(line.get_gid() == "epoch" for line in ax.lines)  # the epoch boundary at step 10
    with pytest.raises(ValueError, match="unknown panel"):
        gradtrace.plot(h, what="gradients")
    # the default panels end with the Embedding tables: one group of bars per table
    emb = next(a for a in gradtrace.plot(h).axes if a.get_title(loc="left").startswith("Embedding tables"))
    assert [t.get_text() for t in emb.get_yticklabels()] == ["inner/item_emb", "inner/user_emb"]
    assert len(emb.patches) == 6


def test_plot_of_a_snapshot_draws_the_failing_step(faulty_run):
    fig = gradtrace.plot(faulty_run.anomalies[0].snapshot)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    bars = [p for p in ax.patches]
    red = [labels[i] for i, p in enumerate(bars) if p.get_facecolor()[0] > 0.8 and p.get_facecolor()[2] < 0.3]
    assert red == ["inner/faulty"]
    assert any(t.get_gid() == "nonfinite" for t in ax.texts)
    # the weight-gradient panel marks only layers with weights (inner/faulty has none)
    weights = fig.axes[1]
    marked = {labels[int(round(t.get_position()[1]))] for t in weights.texts if t.get_gid() == "nonfinite"}
    assert "inner/faulty" not in marked
    assert any(t.get_gid() == "legend" and "nan/inf" in t.get_text() for t in fig.texts)
    assert any(t.get_gid() == "legend" and "white cell" in t.get_text() for t in gradtrace.plot(faulty_run).texts)


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.tables, self.cells, self.external = [], [], [], []
        self._in_td = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "table":
            self.tables.append(attrs.get("id"))
        if tag in ("script", "link") or (attrs.get("src") or "").startswith("http"):
            self.external.append(tag)
        self._in_td = tag == "td"

    def handle_data(self, data):
        if self._in_td:
            self.cells.append(data)


def test_html_report_is_self_contained_and_can_be_rebuilt_from_its_data(faulty_run, tmp_path):
    page = gradtrace.save_report(faulty_run, tmp_path / "report.html")
    parsed = _Page()
    with open(page, encoding="utf-8") as f:
        parsed.feed(f.read())
    assert parsed.images and parsed.images[0].startswith("data:image/png;base64,")
    assert "anomalies" in parsed.tables and not parsed.external
    assert "outer/inner/faulty" in parsed.cells and "nan" in parsed.cells
    for ext in (".data.json", ".data.npz", ".data.meta.json"):
        assert (tmp_path / f"report{ext}").exists()
    from gradtrace import cli

    assert cli.main(["report", str(tmp_path / "report.data.json"), "-o", str(tmp_path / "again.html")]) == 0
    again = _Page()
    with open(tmp_path / "again.html", encoding="utf-8") as f:
        again.feed(f.read())
    assert again.cells == parsed.cells and again.images
    assert cli.main(["report", str(tmp_path / "missing.html"), "-o", str(tmp_path / "x.html")]) == 1


def test_plot_without_matplotlib_says_how_to_install_it(faulty_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r'pip install "gradtrace\[plot\]"'):
        gradtrace.plot(faulty_run)
