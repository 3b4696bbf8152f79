"""Verified hints: at a halt, try the hinted fix and say whether it works.

A halt leaves the model exactly as it was before the held step, and the run
keeps that step's batch (and, with ``verify_hints``, takes the next batches
the fit would have trained on). For each halting anomaly whose hint is a
*setting*, each fix it names is tried in turn, from that state, on those
batches, for ``STEPS`` steps, with the same detectors (warning only):

| hint | the fix tried |
|---|---|
| lower the learning rate | the learning rate 10x lower |
| raise the learning rate (to about X) | the learning rate X |
| clip gradients (clipnorm) | ``clipnorm=1.0`` |
| the inputs / the targets are on a large scale | standardised with the mean and standard deviation of the batches tried |

The fix worked (``Anomaly.verified`` True) when every step's loss and every
weight stay finite, the anomaly's detector does not fire again after the held
step (whose own statistics come from the state the fault left, which no
setting can change), and the loss falls (the mean of the last third of the
steps below the first step's). A fix that needs a change of code (a ``log(0)``
in a custom layer, a layer's initializer) is never tried: ``verified`` stays
None. Afterwards every variable (weights, optimizer slots and ``iterations``,
metric accumulators, seed generator states, Keras' global seed) and the NumPy
and Python random streams are put back bit for bit, and the trials' optimizers
and compiled steps are dropped.
"""

from __future__ import annotations

import gc
import random
import re
import time
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from gradtrace import _keras_compat as compat
from gradtrace import session as session_module
from gradtrace import snapshot as snapshot_module
from gradtrace.anomaly import VERDICT
from gradtrace.looping import loop

_LAYER_SCALE = ("inputs", "targets")


@dataclass(frozen=True)
class Fix:
    """One setting to try: ``kind`` (``learning_rate``, ``clipnorm``, ``inputs``, ``targets``, ``labels``, or a
    layer rebuilt: ``input_dim``, ``units``, ``activation``), its value, and the layer it is about."""

    kind: str
    value: object = None
    was: object = None
    layer: str = ""

    @property
    def rebuilds(self) -> bool:
        """The fix changes a layer's configuration: it is tried on a rebuilt copy of the model."""
        return bool(self.layer)

    def __str__(self):
        if self.kind == "learning_rate":
            return f"learning_rate {self.value:.3g} instead of {self.was:.3g}"
        if self.kind == "clipnorm":
            return f"clipnorm={self.value:g}"
        if self.kind == "labels":
            return "the labels minus 1"
        if self.kind == "from_logits":
            return "from_logits=True on the loss"
        if self.rebuilds:
            return f"{self.kind}={self.value!r} in {self.layer} instead of {self.was!r}"
        return f"the {self.kind} standardised"


def fixes_for(anomaly, optimizer, layers=None, head_path="") -> list[Fix]:
    """The settings ``anomaly``'s hint names (none for a fix that needs a change of code). ``layers``: layer
    path -> layer; ``head_path``: the model's output layer."""
    layers = layers or {}
    hint = (anomaly.hint or "").lower()
    lr = compat.current_learning_rate(optimizer)
    try:
        lr = float(np.asarray(lr))
    except (TypeError, ValueError):  # no single learning rate
        lr = None
    out = []
    if anomaly.layer in _LAYER_SCALE and re.search(r"standardise|scale them|normalization", hint):
        out.append(Fix(anomaly.layer))
    if lr and "lower the learning rate" in hint:
        out.append(Fix("learning_rate", lr / 10, lr))
    raised = re.search(r"raise the learning rate, to about ([0-9.e+-]+)", hint)
    if lr and raised:
        try:
            out.append(Fix("learning_rate", float(raised.group(1).rstrip(".")), lr))
        except ValueError:
            pass
    if "clipnorm" in hint or "clip gradients" in hint:
        out.append(Fix("clipnorm", 1.0))
    if "from_logits=true" in hint:
        out.append(Fix("from_logits", True, False))
    if "subtract 1 from the labels" in hint:
        out.append(Fix("labels", -1))
    layer = layers.get(anomaly.layer)
    table = re.search(r"embedding\(input_dim=(\d+)", hint)
    if table and layer is not None:
        out.append(Fix("input_dim", int(table.group(1)), int(layer.input_dim), anomaly.layer))
    units = re.search(r"give the output layer one unit per class \((\d+) or more\)", hint)
    head = layers.get(head_path) if head_path else None
    if units and head is not None and hasattr(head, "units"):
        out.append(Fix("units", int(units.group(1)), int(head.units), head_path))
    if "use a linear output (activation=none)" in hint and layer is not None and hasattr(layer, "activation"):
        out.append(Fix("activation", "linear", getattr(layer.activation, "__name__", str(layer.activation)),
                       anomaly.layer))
    return out


class SavedState:
    """Every variable a trial may touch and the host random streams, to be put back bit for bit."""

    def __init__(self, model, optimizers):
        seen, self.variables = set(), []
        for v in [*model.variables, *(v for o in optimizers for v in o.variables),
                  *getattr(model, "metrics_variables", []), compat.global_seed_state()]:
            if v is not None and id(v) not in seen:
                seen.add(id(v))
                self.variables.append(v)
        self.values = [v.numpy() for v in self.variables]
        self.streams = (np.random.get_state(), random.getstate())

    def restore(self):
        for v, value in zip(self.variables, self.values):
            v.assign(value)
        np.random.set_state(self.streams[0])
        random.setstate(self.streams[1])


def _trial_optimizer(optimizer, model, fix):
    """A new optimizer of the same kind, with ``fix`` applied, holding the original's state (slots and
    ``iterations``) where it has the same variables."""
    config = optimizer.get_config()
    if fix.kind == "learning_rate":
        config["learning_rate"] = fix.value
    if fix.kind == "clipnorm":
        config.update(clipnorm=fix.value, global_clipnorm=None, clipvalue=None)
    trial = type(optimizer).from_config(config)
    trial.build(model.trainable_variables)
    mine, theirs = trial.variables, optimizer.variables
    if len(mine) == len(theirs):
        for a, b in zip(mine, theirs):
            if len(a.shape) == len(b.shape):
                _fill(a, b.numpy())
    return trial


def _loss_from_logits(model):
    """The model's compiled loss (one Keras crossentropy, by name or object) with ``from_logits=True``."""
    loss = model.loss
    if isinstance(loss, str):
        name = "".join(part.capitalize() for part in loss.split("_"))
        loss = getattr(keras.losses, name, None)
        loss = loss() if isinstance(loss, type) else None
    config = loss.get_config() if isinstance(loss, keras.losses.Loss) else {}
    if "from_logits" not in config:
        name = getattr(model.loss, "__name__", None) or type(model.loss).__name__
        raise ValueError(f"the loss {name} takes no from_logits option (a custom loss: the fix is in its code)")
    return type(loss).from_config({**config, "from_logits": True})


def _rebuilt(model, fix, layers):
    """A copy of ``model`` (functional or Sequential, nested ones too) whose layer ``fix.layer`` is rebuilt
    with ``fix`` in its configuration, compiled with the model's loss, holding the model's values: where a
    variable grew (a table with more rows, a layer with more units) its old values fill the first rows and
    columns and the rest is as initialised."""
    target = layers[fix.layer]

    def clone_layer(layer):
        config = layer.get_config()
        if layer is target:
            config[fix.kind] = fix.value
        return type(layer).from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
    old, new = model.variables, copy.variables
    if len(old) != len(new):
        raise ValueError("the rebuilt model does not have the model's variables")
    for a, b in zip(old, new):
        _fill(b, a.numpy())
    copy.compile(loss=model.loss, loss_weights=getattr(model, "loss_weights", None))
    return copy


def _fill(variable, values):
    """``variable`` takes ``values`` where their shapes overlap (all of it when they are equal)."""
    if tuple(variable.shape) == values.shape:
        variable.assign(values)
        return
    if len(variable.shape) != values.ndim:
        raise ValueError(f"cannot carry {values.shape} over to {tuple(variable.shape)}")
    now = variable.numpy()
    region = tuple(slice(0, min(a, b)) for a, b in zip(now.shape, values.shape))
    now[region] = values[region]
    variable.assign(now)


def _standardiser(batches, which):
    """``batch -> batch`` with the float arrays of x (``which`` = 0) or y (1) standardised per feature, with
    the mean and standard deviation over ``batches``."""
    leaves = [tf.nest.flatten(b[which]) for b in batches]
    stats = []
    for k in range(len(leaves[0])):
        parts = [np.asarray(ls[k]) for ls in leaves]
        if not np.issubdtype(parts[0].dtype, np.floating):
            stats.append(None)
            continue
        a = np.concatenate([p.reshape(-1, p.shape[-1] if p.ndim > 1 else 1) for p in parts], 0)
        stats.append((a.mean(0), np.maximum(a.std(0), 1e-6)))

    def apply(batch):
        flat = tf.nest.flatten(batch[which])
        new = [t if s is None else ((np.asarray(t) - s[0].reshape(-1)) / s[1].reshape(-1)).astype(np.asarray(t).dtype)
               for t, s in zip(flat, stats)]
        out = list(batch)
        out[which] = tf.nest.pack_sequence_as(batch[which], new)
        return tuple(out)

    return apply


@dataclass
class Outcome:
    fix: Fix
    worked: bool
    evidence: str


def _try(model, optimizer, detectors, batches, fix, anomaly, steps, layers):
    """Train ``steps`` steps from the current state with ``fix``; the state is put back by the caller."""
    if fix.rebuilds:
        model = _rebuilt(model, fix, layers)
    trial_opt = _trial_optimizer(optimizer, model, fix)
    if fix.kind in _LAYER_SCALE:
        prepare = _standardiser(batches, 0 if fix.kind == "inputs" else 1)
    elif fix.kind == "labels":
        prepare = (lambda b: (b[0], b[1] + np.asarray(fix.value, np.asarray(b[1]).dtype)) + tuple(b[2:]))
    else:
        prepare = (lambda b: b)

    loss_fn = _loss_from_logits(model) if fix.kind == "from_logits" else None

    def step(x, y, sample_weight):
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            if loss_fn is None:
                loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)
            else:
                loss = loss_fn(y, y_pred, sample_weight) + sum(model.losses, 0.0)
        grads = tape.gradient(loss, model.trainable_variables)
        trial_opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    losses = []
    with loop(model, trial_opt, detectors=detectors, on_anomaly="warn", verbose=0) as w:
        watched = w.step(tf.function(step))
        for k in range(steps):
            x, y, sw = (tuple(prepare(batches[k % len(batches)])) + (None, None))[:3]
            losses.append(float(watched(x, y, sw)))
        found = w.anomalies
    finite = all(np.isfinite(losses)) and all(np.all(np.isfinite(v.numpy())) for v in model.trainable_variables)
    again = [a for a in found if a.detector == anomaly.detector and a.step > anomaly.step]
    third = max(1, steps // 3)
    tail = float(np.mean(losses[-third:])) if finite else float("nan")
    fell = finite and tail < losses[0]
    parts = [f"{steps} steps {'finite' if finite else 'not finite'}"]
    parts.append(f"{anomaly.detector} fired again at step {again[0].step}" if again
                 else f"{anomaly.detector} silent after the held step")
    parts.append(f"loss {losses[0]:.3g} -> {tail:.3g}")
    return Outcome(fix, finite and not again and fell, f"with {fix}: " + ", ".join(parts))


def verify(run, batches, steps) -> float:
    """Try the fixes of every halting anomaly of ``run`` (at a step) whose hint is a setting, on ``batches``
    (``(x, y[, sample_weight])`` tuples: the held step's first); set each anomaly's ``verified`` and
    ``verification``. Returns the seconds it took."""
    start = time.perf_counter()
    model, engine = run.model, run.engine
    optimizer = engine.optimizers[0] if engine.optimizers else None
    halting = [a for a in run.anomalies if a.stage == "step" and a.action in ("halt", "raise")]
    if optimizer is None or not batches or not halting:
        return 0.0
    if not compat.runs_keras_train_step(model) or len(engine.optimizers) > 1:
        for a in halting:
            a.verification = "not tried: the model trains with its own train_step"
        return 0.0
    tap = engine.tap
    layers = {tap.path_of(layer): layer for layer in tap.layers.values()}
    head = model
    while getattr(head, "layers", None):  # the layer that makes the output (inside a nested model too)
        head = head.layers[-1]
    head = tap.path_of(head) if head is not model else ""
    saved = SavedState(model, engine.optimizers)
    cached = session_module.cached_engine(model)  # the fit's compiled steps, kept for its next fit
    tried = {}
    try:
        for a in halting:
            outcomes = []
            for fix in fixes_for(a, optimizer, layers, head):
                key = (fix, a.detector)
                if key not in tried:
                    dets = [d.fresh() for d in engine.detectors]
                    try:
                        tried[key] = _try(model, optimizer, dets, batches, fix, a, steps, layers)
                    except Exception as e:  # a trial that cannot run proves nothing either way
                        tried[key] = Outcome(fix, None, f"with {fix}: could not be tried ({type(e).__name__}: {e})")
                    finally:
                        saved.restore()
                outcomes.append(tried[key])
            if not outcomes:
                continue
            done = [o for o in outcomes if o.worked is not None]
            a.verified = any(o.worked for o in done) if done else None
            worked = [o for o in done if o.worked]
            lead = (f"{'; '.join(str(o.fix) for o in worked)} worked" if worked else
                    "no fix tried helped" if done else "")
            a.verification = "; ".join(([lead] if lead and len(outcomes) > 1 else []) + [o.evidence for o in outcomes])
    finally:
        saved.restore()
        session_module.keep_engine(model, cached)
        gc.collect()
    return time.perf_counter() - start


def after_halt(run):
    """After a fit (or a Watch) that halted, with gradtrace off the model: try the hinted settings and say
    what they gave (with the run's ``verify_hints``)."""
    if not (run.halted and run.verify_batches):
        return
    run.verification_seconds = verify(run, run.verify_batches, run.verify_steps)
    run.verify_batches = []
    for path in {a.snapshot for a in run.anomalies if a.snapshot and a.verification}:
        try:
            snapshot_module.note_verification(path, run.anomalies)
        except Exception as e:  # the snapshot stays as it was written
            run.engine.warn_once("verify_snapshot", f"could not add the verdicts to {path}: {e}")
    if run.verbose:
        for a in run.anomalies:
            if a.verification:
                print(f"gradtrace: {VERDICT[a.verified]} ({a.detector} at {a.layer}, step {a.step}): {a.verification}",
                      flush=True)
