"""Replay a snapshotted step eagerly, every tensor kept, and find the first bad op.

``gradtrace.replay(path)`` rebuilds the model (from the snapshot's
architecture, or onto the ``model`` given), restores every variable (weights,
BatchNorm statistics, seed generator states) and the optimizer state, and runs
the step again, eagerly, through the same engine as ``gradtrace.fit``: same
capture, same statistics, same detectors, but nothing is applied and every
layer's output and gradient is kept in full.

If a value is not finite it then reruns the forward and backward pass once
more with ``tf.debugging.enable_check_numerics()`` (here only: it is slow) to
name the first operation that produced NaN or Inf, the layer it ran in, and
the line of the user's code that created it.
"""

from __future__ import annotations

import json
import os
import re
import traceback
from pathlib import Path
from typing import Callable, Optional, Union

import keras
import numpy as np
import tensorflow as tf

from gradtrace import _keras_compat as compat
from gradtrace import detectors as detectors_module
from gradtrace import snapshot as snapshot_module
from gradtrace.anomaly import build_anomalies
from gradtrace.capturing import LayerTap
from gradtrace.snapshot import SnapshotError
from gradtrace.stats import COL, row_dict
from gradtrace.step import INSPECT, KEY, Engine
from gradtrace.step.rows import weight_owners

class Replay:
    """What a replayed step holds: ``loss``, ``outputs``/``gradients`` by layer path,
    ``weight_gradients`` by layer path and variable name (``outer/tower_a/proj/kernel``), ``anomalies``, ``origin`` and ``table()``."""

    def __init__(self, snapshot, model, loss, outputs, gradients, weight_gradients, table, matrix, anomalies, origin):
        self.snapshot = snapshot
        self.path = snapshot.path
        self.step = snapshot.step
        self.model = model
        self.loss = loss
        self.outputs = outputs
        self.gradients = gradients
        self.weight_gradients = weight_gradients
        self.rows = table
        self.matrix = matrix
        self.anomalies = anomalies
        self.origin = origin

    @property
    def recorded_loss(self) -> float:
        i = next(r["index"] for r in self.snapshot.rows if r["kind"] == "loss")
        return float(self.snapshot.matrix[i][COL["mean"]])

    def stats(self, kind, path) -> dict:
        """The replayed statistics of one row, e.g. ``stats("output", "outer/inner/user_emb")``."""
        i = self.rows.index(kind, path)
        if i is None:
            raise KeyError(f"no {kind} row for {path!r}")
        return row_dict(self.matrix[i])

    def max_difference(self) -> float:
        """Largest relative difference between the recorded and the replayed statistics (0.0: bit for bit;
        a step recorded on several replicas differs by float rounding, its sums taken in another order)."""
        rec = self.snapshot.matrix
        if rec.shape != self.matrix.shape:
            return float("inf")
        a, b = rec.astype(np.float64), self.matrix.astype(np.float64)
        replicas = int(self.snapshot.manifest.get("replicas", 1) or 1)
        if replicas > 1:
            # recorded under a strategy: the loss and the weight gradients were one per replica, their
            # sizes summed over replicas; replay runs the whole batch on one device
            for r in self.rows.rows:
                if r.kind in ("loss", "weight_gradient"):
                    a[r.index, COL["size"]] /= replicas
        both_nan = np.isnan(a) & np.isnan(b)
        same_inf = np.isinf(a) & (a == b)
        with np.errstate(invalid="ignore"):  # inf - inf: a NaN, then told apart below
            diff = np.abs(a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), 1e-6)
        diff[both_nan | same_inf] = 0.0
        return float(np.nanmax(np.where(np.isnan(diff), np.inf, diff))) if diff.size else 0.0

    def table(self) -> str:
        from gradtrace.reporting import layer_table

        return layer_table(self.rows, self.matrix, blamed={a.layer for a in self.anomalies})

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "step": self.step,
            "loss": self.loss,
            "recorded_loss": self.recorded_loss,
            "max_stat_difference": self.max_difference(),
            "anomalies": [a.to_dict() for a in self.anomalies],
            "origin": self.origin,
            "layers": [
                {"path": r.path, "kind": r.kind, "class": r.layer_class, **row_dict(self.matrix[r.index])}
                for r in self.rows.rows
            ],
        }

    def __str__(self):
        from gradtrace.reporting import anomaly_table

        lines = [f"gradtrace replay of {self.path} (step {self.step}): loss {self.loss:.6g} "
                 f"(recorded {self.recorded_loss:.6g})"]
        lines.append(anomaly_table(self.anomalies) if self.anomalies else "no anomaly in the replayed step")
        if self.origin:
            o = self.origin
            lines.append(f"\nFirst non-finite value: op {o['op_type']!r} ({o['op_name']}) in layer {o['layer']!r}, "
                         f"{o['pass']} pass")
            if o.get("source"):
                lines.append(f"  created at {o['source']}")
                if o.get("code"):
                    lines.append(f"    {o['code']}")
        lines.append("\n" + self.table())
        return "\n".join(lines)


def replay(path: Union[str, os.PathLike], model: Optional[keras.Model] = None, custom_objects: Optional[dict] = None,
           safe_mode: bool = True, step: Optional[Callable] = None,
           optimizer: Optional[keras.optimizers.Optimizer] = None) -> Replay:
    """Replay the step of the snapshot at ``path``; see the module docstring. A snapshot of your own loop
    (``gradtrace.loop``) replays your step: pass it (``step=train_step``, as decorated by ``w.step`` or
    not) and the optimizer it applies (``optimizer=``, default ``model.optimizer``)."""
    snap = snapshot_module.load(path)
    own = snap.manifest.get("own_step")
    if own and step is None:
        raise SnapshotError(
            f"{snap.path}: a step of your own loop ({own}); pass it, the model and the optimizer it applies: "
            f"gradtrace.replay(path, model=model, step={own.rsplit('.', 1)[-1]}, optimizer=optimizer)")
    if step is not None and not callable(step):
        raise TypeError(f"step must be your step function, got {type(step).__name__}")
    model = _model_for(snap, model, custom_objects, safe_mode)
    optimizer = optimizer or getattr(model, "optimizer", None)
    _restore(snap, model, optimizer, own_step=step is not None)
    data = tf.nest.map_structure(lambda a: None if a is None else tf.convert_to_tensor(a), snap.data)
    return _replay(snap, model, optimizer, data, step)


def _replay(snap, model, optimizer, data, own=None):
    """Run the snapshotted step (the model's own, or ``own``: your loop's step function) through the engine
    under the ``inspect`` plan: every statistic, every tensor kept, nothing committed."""
    names = [n for n in snap.manifest["detectors"] if n in detectors_module.BUILTINS]
    dets = detectors_module.resolve(names or None)
    tap = LayerTap(model)
    own_fn = None
    if own is not None:  # your step as w.step wrapped it, a tf.function, or a Python function
        own_fn, compiled, own_jit = getattr(own, "gradtrace_step", None) or (
            (own.python_function, True, bool(compat.function_jit_compile(own))) if hasattr(own, "python_function")
            else (own, False, False))
    engine = Engine(model, dets, {d.name: "warn" for d in dets}, tap, optimizers=() if own is None else (optimizer,))
    if own_fn is None:
        step = engine.step_function(INSPECT)  # the model's own step, watched; it measures everything, commits nothing
        jit, eager = bool(model.jit_compile), model.run_eagerly
    else:
        custom = engine.custom_step(INSPECT, own_fn)
        step = lambda batch: custom(*batch)[0]  # noqa: E731
        jit, eager = own_jit, not compiled  # compiled as your step was: a tf.function with its jit_compile

    def inspect(batch):
        out = step(batch)
        ins = engine.variants[INSPECT].inspected
        return out[KEY][0], {k: ins[k] for k in ("loss", "outputs", "gradients")}, \
            [g for _, g in ins["weight_gradients"]]

    # Compiled as the recorded step was (same graph rewrites, so NaN propagates through
    # fused ops exactly as it did in training), unless the model trains eagerly.
    if not eager:
        inspect = tf.function(tf.autograph.experimental.do_not_convert(inspect), jit_compile=jit)
    with engine.installed():
        extra, ins, wgrads = inspect(data)
        _restore(snap, model, optimizer, own_step=own is not None)  # put BatchNorm and seed states back
        variant = engine.variants[INSPECT]
        table = variant.table
        matrix = extra.stats.numpy()
        anomalies = build_anomalies(variant.detectors, engine.actions, table, extra.fired.numpy(),
                                    extra.values.numpy(), matrix, snap.step, snap.manifest["epoch"])
        origin = None
        if np.any((matrix[:, COL["nan"]] != 0) | (matrix[:, COL["inf"]] != 0)):
            origin = _origin(model, data, tap) if own_fn is None else _origin_own(snap, model, optimizer, own_fn,
                                                                                 data, tap)
    return Replay(
        snap, model, float(ins["loss"].numpy()),
        dict(ins["outputs"]),
        {p: g for p, g in ins["gradients"].items() if g is not None},
        _by_layer_path(engine, [v for v, _ in engine.variants[INSPECT].inspected["weight_gradients"]], wgrads),
        table, matrix, anomalies, origin,
    )


def _by_layer_path(engine, variables, grads):
    """``{"<layer path>/<variable name>": gradient}``: keyed like ``Replay.outputs`` (full layer paths), so two
    inner models that each have a layer ``proj`` keep apart (Keras' variable paths would collide)."""
    owners = weight_owners(engine.tap)
    out = {}
    for v, g in zip(variables, grads):
        if g is None:
            continue
        path = owners[id(v)][0][0] if owners.get(id(v)) else v.path.rsplit("/", 1)[0]
        key, k = f"{path}/{v.name}", 1
        while key in out:  # one layer holding two variables of one name
            k += 1
            key = f"{path}/{v.name}_{k}"
        out[key] = g
    return out


def _model_for(snap, model, custom_objects, safe_mode):
    if model is not None:
        if not isinstance(model, keras.Model):
            raise TypeError(f"model must be a keras.Model, got {type(model).__name__}")
        return model
    m = snap.manifest
    if not m["has_architecture"]:
        raise SnapshotError(
            f"{snap.path}: the model {m['model']!r} could not be serialised when the snapshot was written "
            "(a subclassed model without get_config); pass the model: gradtrace.replay(path, model=build_model())"
        )
    config = json.loads((Path(snap.path) / "model.json").read_text())
    objects = snapshot_module.live_classes(snap.path)
    objects.update(custom_objects or {})
    try:
        model = keras.saving.deserialize_keras_object(config, custom_objects=objects, safe_mode=safe_mode)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "safe_mode" in str(e) or "Lambda" in str(e):
            raise SnapshotError(
                f"{snap.path}: the architecture holds code (a Lambda layer or a Python function) and "
                "gradtrace, like Keras, does not run code from a file by default; if you trust this "
                "snapshot, pass safe_mode=False, or pass model=..."
            ) from None
        match = re.search(r"Could not locate class '([^']+)'", str(e))
        cls = match.group(1) if match else None
        hint = (f"the class {cls!r} is not known in this process: import the module that defines it "
                f"(registered with @keras.saving.register_keras_serializable), or pass "
                f"custom_objects={{'{cls}': {cls}}}, or pass model=build_model()") if cls else (
                "pass custom_objects={...} for its custom classes, or model=build_model()")
        raise SnapshotError(f"{snap.path}: cannot rebuild the model ({msg}); {hint}") from None
    if m["has_compile_config"]:
        cfg = json.loads((Path(snap.path) / "compile.json").read_text())
        try:
            with keras.saving.custom_object_scope(objects):
                model.compile_from_config(cfg)
        except Exception as e:
            raise SnapshotError(f"{snap.path}: cannot recompile the model ({e}); pass model=... compiled") from None
    return model


def _restore(snap, model, optimizer=None, own_step=False):
    optimizer = optimizer or getattr(model, "optimizer", None)
    if optimizer is None or not (own_step or getattr(model, "compiled", False)):
        raise SnapshotError(f"{snap.path}: the model is not compiled; compile it as for training, then replay"
                            if not own_step else f"{snap.path}: pass the optimizer your step applies (optimizer=)")
    if not model.built:
        x = snap.data[0] if isinstance(snap.data, tuple) else snap.data
        model(tf.nest.map_structure(lambda a: None if a is None else tf.convert_to_tensor(a), x), training=False)
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    from gradtrace.capturing import variable_paths

    named = variable_paths(model)
    have = [(p, list(v.shape)) for p, v in named]
    want = [tuple(p) if isinstance(p, list) else p for p in snap.manifest["variables"]]
    want = [(p, list(s)) for p, s in want]
    if have != want:
        diff = _diff(have, want)
        raise SnapshotError(f"{snap.path}: the model's variables do not match the snapshot's:\n{diff}")
    for (_, v), value in zip(named, snap.variables):
        v.assign(value)
    opt = list(optimizer.variables)
    want_opt = [(p, list(s)) for p, s in snap.manifest["optimizer_variables"]]
    if [list(v.shape) for v in opt] != [s for _, s in want_opt]:
        diff = _diff([(v.path, list(v.shape)) for v in opt], want_opt)
        raise SnapshotError(f"{snap.path}: the optimizer's variables do not match the snapshot's:\n{diff}")
    for v, value in zip(opt, snap.optimizer_variables):
        v.assign(value)


def _diff(have, want):
    lines = []
    hd, wd = dict(have), dict(want)
    for p, s in want:
        if p not in hd:
            lines.append(f"  missing in the model: {p} {tuple(s)}")
        elif hd[p] != s:
            lines.append(f"  {p}: the model has shape {tuple(hd[p])}, the snapshot {tuple(s)}")
    for p, s in have:
        if p not in wd:
            lines.append(f"  not in the snapshot: {p} {tuple(s)}")
    if not lines and len(have) != len(want):
        lines.append(f"  the model has {len(have)} variables, the snapshot {len(want)}")
    if not lines:
        lines.append("  the same variables in a different order")
    return "\n".join(lines)


_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_LIBS = (os.sep + "tensorflow" + os.sep, os.sep + "keras" + os.sep, os.sep + "absl" + os.sep)


def _is_library(filename):
    if any(s in filename for s in _LIBS) or filename.startswith("<"):
        return True
    # gradtrace's own engine, but not its demo (whose layers are user code)
    return os.path.dirname(os.path.abspath(filename)) == _PACKAGE and not filename.endswith("demo.py")


def _origin(model, data, tap):
    """Rerun forward and backward with numerics checks on; name the first op to produce NaN/Inf."""
    x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
    tf.debugging.enable_check_numerics()
    stage = "forward"
    try:
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True) if compat.call_has_training_arg(model) else model(x)
            stage = "loss"
            loss = compat.compute_loss(model, x, y, y_pred, sw)
        stage = "backward"
        tape.gradient(loss, model.trainable_variables)
        return None
    except (tf.errors.InvalidArgumentError, ValueError) as e:
        return _origin_of(e, stage, tap)
    finally:
        tf.debugging.disable_check_numerics()


def _origin_own(snap, model, optimizer, fn, data, tap):
    """Your own step, eagerly, with numerics checks on: the first op to produce NaN/Inf. The step is stopped
    there, before its update; should it get through, every variable is put back as the snapshot has it."""
    tf.debugging.enable_check_numerics()
    try:
        fn(*data)
        return None
    except (tf.errors.InvalidArgumentError, ValueError) as e:
        return _origin_of(e, "forward" if tap.failure else "backward", tap)
    finally:
        tf.debugging.disable_check_numerics()
        _restore(snap, model, optimizer, own_step=True)


def _origin_of(e, stage, tap):
    """The op, layer, pass and source line a numerics check failed at."""
    text = str(e)
    op = re.search(r'op "?([A-Za-z0-9_]+)"? \(# of outputs', text) or re.search(r'op "([^"]+)"', text)
    name = re.search(r"\(op name: ([^)]+)\)|op name: (\S+)", text)
    failure = tap.failure if stage == "forward" else None
    src, code = _user_frame(e)
    return {
        "op_type": op.group(1) if op else "unknown",
        "op_name": (name.group(1) or name.group(2)) if name else (op.group(1) if op else ""),
        "layer": failure[0] if failure else ("loss" if stage == "loss" else "(backward pass)"),
        "layer_class": failure[1] if failure else "",
        "pass": stage,
        "source": src,
        "code": code,
        "message": text.splitlines()[0][:300] if text else "",
    }


def _user_frame(exc):
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if not _is_library(f.filename)]
    if not user:
        return None, None
    f = user[-1]
    return f"{f.filename}:{f.lineno} in {f.name}", (f.line or "").strip()


__all__ = ["Replay", "replay"]
