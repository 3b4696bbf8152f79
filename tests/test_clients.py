"""gradtrace on the client libraries: KerasHub and Keras Recommenders models, built from constructors.

For each model: ``gradtrace.fit`` trains it bit for bit as ``model.fit`` does (every batch's loss, every
weight), the default detectors say nothing, the nested layers are captured, and one realistic fault is
caught at the right layer and step (see ``tests/clients_models.py`` for the models and their sources).
"""

import warnings

import keras
import numpy as np
import pytest

import gradtrace
from tests import clients_models as C

import keras_hub  # noqa: F401  (the clients are in the test extras: a missing one is an error, not a skip)
import keras_rs  # noqa: F401


class Losses(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float((logs or {}).get("loss", np.nan)))


def _fit(fit, model, x, y, batch_size=8, **kw):
    cb = Losses()
    history = fit(model, x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0, callbacks=[cb], **kw)
    return history, cb.losses


def _plain(model, x, y, **kw):
    return model.fit(x=x, y=y, **kw)


def parity(build, data, batch_size=8):
    """Train one copy with ``model.fit`` and one with ``gradtrace.fit``; assert they are equal bit for bit
    and that the default detectors said nothing. Returns the gradtrace History and the captured paths."""
    x, y = data
    plain = build()
    _, plain_losses = _fit(_plain, plain, x, y, batch_size)
    watched = build()
    history, losses = _fit(gradtrace.fit, watched, x, y, batch_size)
    assert [str(a) for a in history.anomalies] == []
    n = len(next(iter(y.values())) if isinstance(y, dict) else y)
    assert losses == plain_losses and len(losses) == n // batch_size
    for a, b in zip(plain.weights, watched.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
    for a, b in zip(plain.optimizer.variables, watched.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
    paths = {r.path for r in history.gradtrace.engine.tables[True].rows}
    return history, paths


def fault(build, data, batch_size=8, **kw):
    x, y = data
    history, _ = _fit(gradtrace.fit, build(), x, y, batch_size, **kw)
    return history.anomalies


def _has(paths, *parts):
    for part in parts:
        assert any(part in p for p in paths), f"{part!r} not captured; captured: {sorted(paths)[:40]}"


# -- KerasHub ------------------------------------------------------------------------------------
def test_gpt2_causal_lm_reverse_embedding_is_untouched_and_ids_beyond_vocabulary_are_caught():
    history, paths = parity(C.gpt2_lm, C.token_data())
    # the tied output projection (token_embedding called with reverse=True) is captured as a layer call,
    # not checked as ids: only the first call of the table is an ids row
    _has(paths, "token_embedding#2", "position_embedding", "self_attention/query", "feedforward_output_dense")
    ids_rows = [r.path for r in history.gradtrace.engine.tables[True].rows if r.kind == "ids"]
    assert [p.rsplit("/", 1)[-1] for p in ids_rows] == ["token_embedding"]
    x, y = C.token_data()
    x["token_ids"][17, 3] = C.VOCAB  # an id at the vocabulary size, in the third batch
    found = fault(C.gpt2_lm, (x, y))
    assert [(a.detector, a.step) for a in found] == [("embedding_out_of_range", 2)]
    assert found[0].layer.endswith("/token_embedding") and "64" in found[0].message


def test_gemma_causal_lm_with_a_learning_rate_of_10_is_caught_at_the_first_bad_update():
    _, paths = parity(C.gemma_lm, C.token_data())
    _has(paths, "token_embedding", "token_embedding#2", "decoder_block_0/attention/query", "decoder_block_0/ffw_linear")
    found = fault(lambda: C.gemma_lm(lr=10.0), C.token_data(n=64))
    assert found, "a learning rate of 10 went unnoticed"
    first = found[0]
    assert first.step <= 3, [str(a) for a in found]
    assert any("learning rate" in (a.message + a.hint).lower() for a in found), [str(a) for a in found]


def test_bert_classifier_with_ids_beyond_the_vocabulary():
    _, paths = parity(C.bert_classifier, C.bert_data())
    _has(paths, "token_embedding", "segment_embedding", "transformer_layer_0/self_attention_layer/key", "logits")
    x, y = C.bert_data()
    x["token_ids"][9, 0] = C.VOCAB + 5
    found = fault(C.bert_classifier, (x, y))
    assert [(a.detector, a.step) for a in found] == [("embedding_out_of_range", 1)]
    assert found[0].layer.endswith("token_embedding")


def test_frozen_kerashub_task_falls_back_to_its_own_fit():
    model = C.bert_classifier()
    model.trainable = False
    x, y = C.bert_data(n=16)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = gradtrace.fit(model, x, y, batch_size=8, verbose=0, shuffle=False)
    assert history.anomalies == [] and np.isfinite(history.history["loss"][0])
    said = [str(w.message) for w in seen]
    assert any("gradtrace" not in m and "trainable weights" in m for m in said)  # Keras' own, as under model.fit
    assert any("gradtrace" in m and "no trainable weights" in m for m in said)


def test_bart_seq2seq_lm():
    _, paths = parity(C.bart_lm, C.seq2seq_data())
    # the shared table: the encoder's lookup, the decoder's, and the tied output projection (reverse=True)
    _has(paths, "transformer_encoder_layer_0/self_attention_layer/key", "transformer_decoder_layer_0/cross_attention/query",
         "token_embedding#3")


# -- Keras Recommenders --------------------------------------------------------------------------
def test_two_tower_retrieval_and_the_candidate_table_missing_its_plus_one():
    history, paths = parity(C.two_tower, C.retrieval_data(), batch_size=16)
    _has(paths, "user_embedding", "candidate_embedding")
    # the candidate table is shared with BruteForceRetrieval, which never runs in training: its gradient
    # is filed under the layer that used it
    grads = {r.path for r in history.gradtrace.engine.tables[True].rows if r.kind == "weight_gradient"}
    assert any(p.endswith("candidate_embedding") for p in grads) and not any(p.endswith("/retrieval") for p in grads)
    found = fault(lambda: C.two_tower(plus_one=False), C.retrieval_data(), batch_size=16)
    assert [(a.detector, a.step) for a in found] == [("embedding_out_of_range", 2)]
    # named by the attribute the model's code uses, with Keras' automatic name kept as an alias
    assert found[0].layer.endswith("/candidate_embedding")
    assert found[0].layer_alias.rsplit("/", 1)[-1].startswith("embedding") and found[0].at(found[0].layer_alias)
    assert f"input_dim={C.MOVIES + 1}" in found[0].message + found[0].hint


def test_dcn_feature_cross_and_a_nan_feature():
    _, paths = parity(C.dcn, C.ranking_data(dense=False))
    _has(paths, "dcn/cross_1", "dcn/cross_2", "dcn/cross_1/", "movie_id_embedding")  # FeatureCross internals
    x, y = C.ranking_data(dense=False)
    y = y.copy()
    y[20, 0] = np.nan  # a rating that failed to parse, in the third batch
    found = fault(C.dcn, (x, y))
    assert [(a.detector, a.step, a.layer) for a in found][:1] == [("nan", 2, "targets")]


def test_dlrm_and_a_table_sized_for_50000_ids_fed_ids_below_500():
    _, paths = parity(C.dlrm, C.ranking_data())
    _has(paths, "dlrm/interaction", "dlrm/bottom_2", "user_id_embedding")
    rng = np.random.default_rng(1)
    x, y = C.ranking_data(n=512)
    x["user_id"] = rng.integers(0, 500, size=(512,)).astype("int32")
    found = fault(lambda: C.dlrm(vocab_of={"user_id": 50_000}), (x, y), batch_size=64)
    assert [(a.detector, a.layer) for a in found] == [("unused_embedding", "dlrm/user_id_embedding")]
