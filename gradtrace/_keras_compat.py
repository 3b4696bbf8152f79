"""The one place where gradtrace touches private Keras names.

Checked against Keras 3.15.1 on TensorFlow 2.21. Every private attribute used
anywhere in gradtrace is reached through a function in this module, so a Keras
upgrade that moves one of them is fixed here and nowhere else.
"""

from __future__ import annotations

import keras


def sublayers(layer) -> list:
    """Direct tracked sublayers of ``layer`` (lists and dicts included), in order."""
    return list(layer._flatten_layers(include_self=False, recursive=False))


def all_layers(model) -> list:
    """Every tracked layer reachable from ``model``, the model itself excluded."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def call_has_training_arg(model) -> bool:
    return bool(getattr(model, "_call_has_training_arg", True))


def compute_loss(model, x, y, y_pred, sample_weight):
    """The model's compiled loss plus ``model.losses``, as Keras' train_step computes it."""
    return model._compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
    )


def update_loss_tracker(model, loss, batch_size):
    """Feed the step's loss to the ``loss`` metric exactly as Keras' train_step does."""
    from keras.src.losses import loss as loss_module

    tracker = getattr(model, "_loss_tracker", None)
    if tracker is not None:
        tracker.update_state(
            loss_module.unscale_loss_for_distribution(loss), sample_weight=batch_size
        )


def is_compiled(model) -> bool:
    return bool(getattr(model, "compiled", False)) and getattr(model, "optimizer", None) is not None


def overrides_train_step(model) -> bool:
    """True when the user's model class defines its own ``train_step``."""
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    for cls in type(model).__mro__:
        if "train_step" in cls.__dict__:
            return cls is not TensorFlowTrainer
    return False


def current_learning_rate(optimizer):
    return optimizer.learning_rate


def is_history(cb) -> bool:
    return isinstance(cb, keras.callbacks.History)
