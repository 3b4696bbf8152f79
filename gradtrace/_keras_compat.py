"""The one place where gradtrace touches private Keras names.

Checked against Keras 3.15.1 on TensorFlow 2.21, and Keras 3.8.0 on TensorFlow 2.18.1
(the oldest supported). Every private attribute used
anywhere in gradtrace is reached through a function in this module, so a Keras
upgrade that moves one of them is fixed here and nowhere else.
"""

from __future__ import annotations

import re

import keras


def sublayers(layer) -> list:
    """Direct tracked sublayers of ``layer`` (lists and dicts included), in order."""
    return list(layer._flatten_layers(include_self=False, recursive=False))


def flatten_layers(layer) -> list:
    """``layer`` and every tracked layer reachable from it."""
    return list(layer._flatten_layers(include_self=True, recursive=True))


def keras_logits(t):
    """The logits Keras keeps on a softmax/sigmoid output (its crossentropy reads them), or ``None``."""
    return getattr(t, "_keras_logits", None)


def summary_pb2():
    """TensorFlow's ``Summary`` protocol buffers (the plugin metadata TensorBoard reads)."""
    from tensorflow.core.framework import summary_pb2 as module

    return module


def is_graph_model(layer) -> bool:
    """A Functional or Sequential model: its layers are nodes of a graph, not attributes of its code."""
    from keras.src.models.functional import Functional

    return isinstance(layer, (Functional, keras.Sequential))


def _snake_case(name):
    # keras.src.utils.naming.to_snake_case
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def is_auto_name(layer) -> bool:
    """True when ``layer.name`` is the one Keras gave it (its class in snake case, maybe numbered)."""
    return re.fullmatch(re.escape(_snake_case(type(layer).__name__)) + r"(_\d+)?", layer.name) is not None


def all_layers(model) -> list:
    """Every tracked layer reachable from ``model``, the model itself excluded."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def call_has_training_arg(model) -> bool:
    return bool(getattr(model, "_call_has_training_arg", True))


def uses_merge_call() -> bool:
    """True when the current strategy's replicas synchronise through ``merge_call`` (one host,
    no XLA), False where it must not be used (multi-worker, XLA on GPUs)."""
    import tensorflow as tf

    return not tf.__internal__.distribute.strategy_supports_no_merge_call()


def detector_variable(initial_value, name):
    """A non-trainable variable for a detector's state, made while the step is being traced.

    A ``tf.Variable`` made during a ``tf.function``'s first trace makes TensorFlow trace the whole
    step a second time (to check that no later call creates variables), which doubles the cost of
    the first step. Outside a strategy the state is made directly as a ``ResourceVariable``,
    eagerly (under ``init_scope``) and past the variable-creator stack, so the function does not
    count it as its own and traces once. Under a strategy it goes through the strategy's creator,
    as ``tf.Variable`` does, so that every replica holds its own copy."""
    import tensorflow as tf
    from tensorflow.python.ops import resource_variable_ops

    with tf.init_scope():
        if tf.distribute.has_strategy():
            return tf.Variable(initial_value, trainable=False, name=name)
        return resource_variable_ops.ResourceVariable(initial_value, trainable=False, name=name)


def plain_variable(initial_value, name, shape=None):
    """A variable of gradtrace's own (the step's record for the host), made while the step is
    traced, eagerly and past every variable creator: under a strategy each replica's trace makes
    its own (no mirroring, no aggregation), and the function does not count it as its own (no
    second trace). ``shape=tf.TensorShape(None)`` makes a variable that takes any shape."""
    import tensorflow as tf
    from tensorflow.python.ops import resource_variable_ops

    with tf.init_scope():
        value = initial_value() if callable(initial_value) else initial_value
        return resource_variable_ops.ResourceVariable(value, trainable=False, name=name, shape=shape)


def make_train_function(model, step_function, jit_compile=None):
    """The train function Keras' own ``make_train_function`` builds (its ``steps_per_execution``
    loop over the iterator, ``strategy.run``, replica reduction, ``tf.function`` with the model's
    ``jit_compile``), around ``step_function`` instead of ``model.train_step``. The model's
    ``train_step`` and ``train_function`` are left as they were.

    Under ``MultiWorkerMirroredStrategy`` Keras' own function fails on its replica reduction
    (``model.fit`` too, in Keras 3.15: see :func:`compile_step`), so the step is compiled by
    :func:`compile_step` and called ``steps_per_execution`` times per call on the iterator.

    ``jit_compile`` (when not None) replaces the model's own for this function only: a step that
    compiles its own XLA part (see ``Engine.train_function``) is wrapped without XLA."""
    import tensorflow as tf

    if jit_compile is not None and bool(jit_compile) != bool(model.jit_compile):
        saved = model.jit_compile
        model.jit_compile = jit_compile
        try:
            return make_train_function(model, step_function)
        finally:
            model.jit_compile = saved
    if isinstance(model.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
        one_step = compile_step(model, step_function)

        def function(iterator):
            outputs = None
            for _, data in zip(range(max(1, int(model.steps_per_execution))), iterator):
                outputs = one_step(data)
            if outputs is None:
                raise StopIteration
            return outputs

        return function
    from gradtrace.hooks import set_on_instance

    saved_function = model.train_function
    restore = set_on_instance(model, "train_step", step_function)
    try:
        model.make_train_function(force=True)
        return model.train_function
    finally:
        restore()
        model.train_function = saved_function


def build_state_before_tracing(model, iterator):
    """Build the compile metrics' and the compiled loss's state from the iterator's element spec,
    as Keras' ``_symbolic_build`` does under a strategy, before the train function is traced.

    Without a strategy Keras defers that building to the first trace of its train function; a
    ``tf.function`` that creates variables while it is traced is traced a second time, so the
    (watched) step would be traced twice. Returns False where the spec cannot be used (the step is
    then traced as Keras would trace it)."""
    if getattr(model, "_distribute_strategy", None) is not None:
        return False  # Keras builds it itself, from the first batch
    metrics = getattr(model, "_compile_metrics", None)
    loss = getattr(model, "_compile_loss", None)
    if (metrics is None or metrics.built) and (loss is None or loss.built):
        return False
    spec = getattr(iterator, "element_spec", None)
    if spec is None:
        return False
    try:
        model._symbolic_build(data_batch=spec)
    except Exception:  # a spec Keras cannot turn into symbolic inputs (ragged, sparse): build on trace
        return False
    return True


def model_optimizers(model, extra=()):
    """``[(name, optimizer)]``: the optimizers a step of ``model`` may apply, named as the model knows
    them: ``model.optimizer`` ("optimizer") and every optimizer attribute of the model (a GAN's
    ``d_optimizer`` and ``g_optimizer``), then ``extra``."""
    out, seen = [], set()

    def add(name, opt):
        if isinstance(opt, keras.optimizers.Optimizer) and id(opt) not in seen:
            seen.add(id(opt))
            out.append((name, opt))

    add("optimizer", getattr(model, "optimizer", None))
    for name, value in vars(model).items():
        add(name.lstrip("_"), value)
    for opt in extra:
        add(getattr(opt, "name", "optimizer"), opt)
    return out


def function_jit_compile(fn):
    """The ``jit_compile`` a ``tf.function`` was made with (``None`` when not set)."""
    return getattr(fn, "_jit_compile", None)


def optimizer_trainable_variables(optimizer):
    """The variables an optimizer was built on (what ``apply(grads)`` without variables updates)."""
    return list(optimizer._trainable_variables)


def trainer_class():
    """Keras' trainer class for the TensorFlow backend (``class M(trainer_class(), keras.layers.Dense)``
    is Keras' own pattern for a Trainer that is not a ``keras.Model``)."""
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    return TensorFlowTrainer


def is_trainer(model) -> bool:
    """True for a Keras ``Trainer`` (every ``keras.Model``, and Keras' own ``class M(TensorFlowTrainer,
    Layer)`` pattern)."""
    from keras.src.trainers.trainer import Trainer

    return isinstance(model, Trainer) and isinstance(model, keras.layers.Layer)


def op_callback_count() -> int:
    """How many op callbacks TensorFlow has registered in this thread: ``tf.debugging.enable_check_numerics``
    and ``tf.debugging.experimental.enable_dump_debug_info`` each add one; 0 when both are off."""
    from tensorflow.python.eager import context

    return len(context.context().op_callbacks)


def compute_loss(model, x, y, y_pred, sample_weight):
    """The model's compiled loss plus ``model.losses``, as Keras' train_step computes it."""
    return model._compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
    )


def is_compiled(model) -> bool:
    return bool(getattr(model, "compiled", False)) and getattr(model, "optimizer", None) is not None


def runs_keras_train_step(model) -> bool:
    """True when the model's step is Keras' own ``train_step`` (not overridden by its class)."""
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    return type(model).train_step is TensorFlowTrainer.train_step


def iterations(optimizer):
    """The optimizer's count of applied updates. Under a ``LossScaleOptimizer`` this is the
    inner optimizer's: before Keras 3.9 the wrapper's own ``iterations`` never advanced
    (keras-team/keras#20878, fixed by #20901), so every step would read 0."""
    inner = getattr(optimizer, "inner_optimizer", None)
    return inner.iterations if inner is not None else optimizer.iterations


def current_learning_rate(optimizer):
    """The optimizer's learning rate, or ``None`` for one without a single learning rate
    (an optimizer that routes variables to several inner optimizers)."""
    try:
        return optimizer.learning_rate
    except (ValueError, AttributeError, TypeError, NotImplementedError):
        return None


def optimizer_kind(optimizer) -> str:
    """The class name of the optimizer that does the update (a LossScaleOptimizer's inner one)."""
    return type(getattr(optimizer, "inner_optimizer", optimizer)).__name__


def is_history(cb) -> bool:
    return isinstance(cb, keras.callbacks.History)


def compile_step(model, step_function, same_on_every_replica=()):
    """Compile ``step_function(data)`` the way Keras' ``make_train_function`` compiles its
    step (``strategy.run``, replica reduction, ``tf.function`` with ``reduce_retracing``
    and the model's ``jit_compile``; eager when ``run_eagerly``), on a batch rather than an
    iterator: for the steps gradtrace runs on a batch it holds (the full report of a held
    step, the redo of a snapshotted one) and, under ``MultiWorkerMirroredStrategy``, for
    every step (see :func:`make_train_function`).

    Outputs named in ``same_on_every_replica`` hold the same values on every
    replica and are taken from the first; the others are reduced as Keras
    reduces its logs (``"auto"``)."""
    import tensorflow as tf
    from keras.src.backend.tensorflow.trainer import reduce_per_replica

    @tf.autograph.experimental.do_not_convert
    def one_step_on_data(data):
        strategy = model.distribute_strategy
        outputs = dict(strategy.run(step_function, args=(data,)))
        same = {k: outputs.pop(k) for k in same_on_every_replica if k in outputs}
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            # Keras' "auto" reduction calls strategy.reduce("MEAN", v, axis=0) on scalar
            # logs here, which fails (model.fit too, in Keras 3.15): the mean over replicas.
            logs = tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), outputs)
        else:
            logs = reduce_per_replica(outputs, strategy, reduction="auto")
        logs.update(reduce_per_replica(same, strategy, reduction="first"))
        return logs

    if not model.run_eagerly:
        one_step_on_data = tf.function(one_step_on_data, reduce_retracing=True, jit_compile=model.jit_compile)
    autoconvert = getattr(model, "_autoconvert_optionals", None)
    return autoconvert(one_step_on_data) if autoconvert else one_step_on_data


def compile_identity(model):
    """Changes whenever ``model.compile`` runs again (a new loss container is made)."""
    return id(getattr(model, "_compile_loss", None)), id(getattr(model, "_compile_metrics", None))


class first_batch_build_fix:
    """For one fit: Keras' ``_maybe_symbolic_build`` takes the first batch's shapes with
    ``strategy.reduce("MEAN", batch)``, which fails eagerly under
    ``MultiWorkerMirroredStrategy`` (``model.fit`` itself raises "Attempt to convert a
    value (PerReplica...)" in Keras 3.15). The batch only gives shapes for a symbolic
    build, so this uses the first local replica's shard instead. Installed on the
    instance and removed on exit."""

    def __init__(self, model):
        self.model = model
        self.active = False

    def __enter__(self):
        import tensorflow as tf

        model = self.model
        strategy = getattr(model, "_distribute_strategy", None)
        original = getattr(type(model), "_maybe_symbolic_build", None)
        if strategy is None or original is None or "_maybe_symbolic_build" in model.__dict__:
            return self

        def build(iterator=None, data_batch=None):
            if iterator is not None and data_batch is None:
                for _, _, it in iterator:
                    batch = next(it)
                    data_batch = tf.nest.map_structure(
                        lambda v: strategy.experimental_local_results(v)[0]
                        if isinstance(v, tf.distribute.DistributedValues) else v, batch)
                    break
            return original(model, iterator=None, data_batch=data_batch)

        model._maybe_symbolic_build = build
        self.active = True
        return self

    def __exit__(self, *exc):
        if self.active:
            del self.model.__dict__["_maybe_symbolic_build"]
        return False


def global_seed_state():
    """The state variable of Keras' global seed generator (what ``keras.random`` draws from when no seed is
    given), or None while nothing has made one."""
    from keras.src.backend.common import global_state

    gen = global_state.get_global_attribute("global_seed_generator")
    return None if gen is None else gen.state


def updates_one_variable_at_a_time(optimizer) -> bool:
    """Whether ``optimizer.apply`` reaches each variable through one ``update_step(grad, variable, lr)`` call
    (every built-in Keras optimizer on the TensorFlow backend): then each variable's update, its slots
    included, can be gated on its own (``guard="variable"``). Not a LossScaleOptimizer (it skips non-finite
    steps itself), not gradient accumulation, not an optimizer that overrides how updates are applied."""
    from keras.src.backend.tensorflow.optimizer import TFOptimizer
    from keras.src.optimizers.base_optimizer import BaseOptimizer

    cls = type(optimizer)
    return (isinstance(optimizer, TFOptimizer) and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
            and not getattr(optimizer, "gradient_accumulation_steps", None)
            and cls.apply is BaseOptimizer.apply
            and cls._backend_apply_gradients is BaseOptimizer._backend_apply_gradients
            and cls._backend_update_step is TFOptimizer._backend_update_step
            and cls._distributed_tf_update_step is TFOptimizer._distributed_tf_update_step)
