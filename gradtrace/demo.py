"""A real fault, caught and explained: ``python -m gradtrace.demo`` (and ``python -m gradtrace.demo
embeddings`` for a recommender whose item table is sized for a catalogue its data never reaches).

A recommender in the style of the mission: an outer model wraps an "inner"
model with two Embedding layers (users and items) and a numeric ``price``
feature that a custom layer log-scales. One batch holds an item priced 0
(a free item: perfectly valid data), ``log(0)`` is ``-inf``, and from there
the loss becomes NaN. ``model.fit`` would silently write NaN into every
weight; ``gradtrace.fit`` halts at that step before the update, names the
layer inside the inner model, and leaves the weights finite.
"""

from __future__ import annotations

import importlib
import os
import sys


def _import_tensorflow_quietly():
    """The demo should read cleanly: TensorFlow's C++ runtime prints a few lines when it is first
    imported, before its logging is set up (``TF_CPP_MIN_LOG_LEVEL`` does not reach them). While
    TensorFlow is imported, and only then, standard error goes to /dev/null. (``import gradtrace``
    imports nothing heavy, so the demo is the first to import TensorFlow.)"""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        fd = sys.stderr.fileno() if "tensorflow" not in sys.modules else None
    except (AttributeError, OSError, ValueError):  # no real standard error (a notebook, a test's capture)
        fd = None
    if fd is None:
        importlib.import_module("tensorflow")
        return
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            importlib.import_module("tensorflow")
    finally:
        os.dup2(saved, fd)
        os.close(saved)


_import_tensorflow_quietly()

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

import gradtrace  # noqa: E402

N_USERS, N_ITEMS, BATCH = 2000, 500, 64


@keras.saving.register_keras_serializable(package="gradtrace_demo")
class LogPrice(keras.layers.Layer):
    """log-scales a positive price feature (the bug: price 0 is allowed by the data)."""

    def call(self, price):
        return ops.log(price)


def build_model():
    user = keras.Input((1,), dtype="int32", name="user")
    item = keras.Input((1,), dtype="int32", name="item")
    price = keras.Input((1,), name="price")
    u = keras.layers.Flatten(name="user_vec")(keras.layers.Embedding(N_USERS, 16, name="user_emb")(user))
    i = keras.layers.Flatten(name="item_vec")(keras.layers.Embedding(N_ITEMS, 8, name="item_emb")(item))
    p = LogPrice(name="log_price")(price)
    h = keras.layers.Concatenate(name="features")([u, i, p])
    inner = keras.Model([user, item, price], h, name="inner")

    user2 = keras.Input((1,), dtype="int32", name="user")
    item2 = keras.Input((1,), dtype="int32", name="item")
    price2 = keras.Input((1,), name="price")
    z = inner([user2, item2, price2])
    z = keras.layers.Dense(64, activation="relu", name="hidden")(z)
    out = keras.layers.Dense(1, activation="sigmoid", name="click")(z)
    model = keras.Model([user2, item2, price2], out, name="recommender")
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    return model


def make_data(n=64 * 40, free_item_at=37 * 64 + 5, seed=0):
    rng = np.random.default_rng(seed)
    user = rng.integers(0, N_USERS, (n, 1)).astype("int32")
    item = rng.integers(0, N_ITEMS, (n, 1)).astype("int32")
    price = rng.uniform(1.0, 100.0, (n, 1)).astype("float32")
    price[free_item_at] = 0.0  # one free item, in the batch of step 37
    y = (rng.random((n, 1)) < 0.3).astype("float32")
    return [user, item, price], y


N_CATALOGUE, N_SOLD = 50_000, 480


def build_recommender():
    """Users and items, each an Embedding inside an inner model; the item table is sized for the whole
    catalogue (50,000 ids), but the interactions only ever hold the 480 items the shop sold."""
    user = keras.Input((1,), dtype="int32", name="user")
    item = keras.Input((1,), dtype="int32", name="item")
    u = keras.layers.Flatten(name="user_vec")(keras.layers.Embedding(N_USERS, 16, name="user_emb")(user))
    i = keras.layers.Flatten(name="item_vec")(keras.layers.Embedding(N_CATALOGUE, 16, name="item_emb")(item))
    inner = keras.Model([user, item], keras.layers.Concatenate(name="features")([u, i]), name="towers")
    user2 = keras.Input((1,), dtype="int32", name="user")
    item2 = keras.Input((1,), dtype="int32", name="item")
    z = keras.layers.Dense(32, activation="relu", name="hidden")(inner([user2, item2]))
    model = keras.Model([user2, item2], keras.layers.Dense(1, activation="sigmoid", name="click")(z),
                        name="recommender")
    model.compile(optimizer="adam", loss="binary_crossentropy")
    return model


def _pictures(history, name):
    """Write ``name.png`` (every layer over the run) and ``name.html`` (the report to attach to a bug
    report), when matplotlib is installed."""
    try:
        fig = gradtrace.plot(history)
    except ImportError as e:
        print(f"\n(No picture: {e})")
        return
    fig.savefig(f"{name}.png", dpi=100)
    page = gradtrace.save_report(history, f"{name}.html")
    print(f"\nPicture: {os.path.abspath(name + '.png')}\nReport:  {os.path.abspath(page)}")


def embeddings_demo():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    n = 2560
    ranks = np.arange(1, N_SOLD + 1, dtype=np.float64) ** -1.1  # popular items first
    item = rng.choice(N_SOLD, size=(n, 1), p=ranks / ranks.sum()).astype("int32")
    user = rng.integers(0, N_USERS, (n, 1)).astype("int32")
    y = (rng.random((n, 1)) < np.where(item < 50, 0.5, 0.2)).astype("float32")
    model = build_recommender()
    print(f"Training a recommender with gradtrace.fit: its item table has {N_CATALOGUE:,} rows, and the "
          f"{n:,} interactions only hold items below {N_SOLD}...\n")
    history = gradtrace.fit(model, [user, item], y, batch_size=BATCH, epochs=1, verbose=1)
    print("\nEvery table at a glance (history.gradtrace.embedding_tables(), also in gradtrace.report):")
    from gradtrace.embeddings import table_text

    print(table_text(history.gradtrace.embedding_tables()))
    found = [a for a in history.anomalies if a.detector == "unused_embedding"]
    return 0 if found and found[0].layer == "recommender/towers/item_emb" else 1


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "embeddings":
        return embeddings_demo()
    if argv:
        raise SystemExit(f"usage: python -m gradtrace.demo [embeddings] (got {' '.join(argv)!r})")
    keras.utils.set_random_seed(0)
    model = build_model()
    x, y = make_data()
    print("Training a two-embedding inner model with gradtrace.fit (one batch holds a free item, price 0)...\n")
    history = gradtrace.fit(model, x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=1)
    weights_finite = all(np.isfinite(w).all() for w in model.get_weights())
    print()
    if not history.anomalies:
        raise SystemExit("demo failed: gradtrace found nothing")
    a = history.anomalies[0]
    print(f"Caught: {a.detector} at step {a.step}, in layer {a.layer!r}.")
    print(f"optimizer.iterations = {int(model.optimizer.iterations)} (the bad step was not applied); "
          f"all weights finite: {weights_finite}.")
    _pictures(history, "gradtrace_demo")
    return 0 if weights_finite and a.layer == "recommender/inner/log_price" else 1


if __name__ == "__main__":
    raise SystemExit(main())
