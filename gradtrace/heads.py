"""The static half of the head/loss checks: what kind of loss the model was compiled with.

``loss_kind(model)`` reads the ``loss`` given to ``model.compile`` (a name, a
``keras.losses.Loss`` or a function) and returns ``(kind, from_logits)``
(``loss_object_kind(loss)``: the same for a loss a custom ``train_step`` calls itself);
``kind`` is one of ``"binary_crossentropy"``, ``"categorical_crossentropy"``,
``"sparse_categorical_crossentropy"``, ``"regression"`` (squared, absolute,
Huber, log-cosh errors), ``"bounded"`` (cosine similarity), ``"other"`` (anything else, a custom loss included)
or ``"several"`` (one loss per output: the checks then leave the losses alone).
"""

from __future__ import annotations

import keras

_KINDS = {
    "binarycrossentropy": "binary_crossentropy",
    "bce": "binary_crossentropy",
    "binaryfocalcrossentropy": "binary_crossentropy",
    "categoricalcrossentropy": "categorical_crossentropy",
    "cce": "categorical_crossentropy",
    "categoricalfocalcrossentropy": "categorical_crossentropy",
    "sparsecategoricalcrossentropy": "sparse_categorical_crossentropy",
    "meansquarederror": "regression",
    "mse": "regression",
    "meanabsoluteerror": "regression",
    "mae": "regression",
    "huber": "regression",
    "huberloss": "regression",
    "logcosh": "regression",
    "meansquaredlogarithmicerror": "regression",
    "msle": "regression",
    # bounded in [-1, 1], around 0 at the start: no scale to run away from
    "cosinesimilarity": "bounded",
}

CROSSENTROPY = ("binary_crossentropy", "categorical_crossentropy", "sparse_categorical_crossentropy")


def loss_kind(model) -> tuple[str, bool]:
    loss = getattr(model, "loss", None)
    if isinstance(loss, dict):
        loss = list(loss.values())
    if isinstance(loss, (list, tuple)):
        if len(loss) != 1:
            return "several", False
        loss = loss[0]
    return loss_object_kind(loss)


def loss_object_kind(loss) -> tuple[str, bool]:
    """``(kind, from_logits)`` of one loss: a name, a ``keras.losses.Loss`` or a function."""
    from_logits = False
    if isinstance(loss, str):
        name = loss
    elif isinstance(loss, keras.losses.Loss):
        name = type(loss).__name__
        try:
            from_logits = bool(loss.get_config().get("from_logits", False))
        except Exception:  # a custom Loss without a config
            from_logits = False
    elif callable(loss):
        name = getattr(loss, "__name__", "")
    else:
        return "other", False
    return _KINDS.get(name.replace("_", "").lower(), "other"), from_logits
