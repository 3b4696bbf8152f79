"""Every private Keras/TensorFlow name is reached through ``gradtrace/_keras_compat.py`` and nowhere else.

A Keras upgrade that moves one of them must then be fixed in one place. The
check reads the source (no training): private modules (``keras.src``,
``tensorflow.python``, ``tf.__internal__``) and any attribute whose name is a
private attribute of a Keras or TensorFlow object (``model._compute_loss``,
``optimizer._trainable_variables``), found by asking those objects themselves.
"""

import ast
import pathlib

import keras
import tensorflow as tf

ROOT = pathlib.Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "gradtrace" / "_keras_compat.py"
PRIVATE_MODULES = ("keras.src", "tensorflow.python", "tensorflow.core", "__internal__")


def _private_names():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(), loss="mse", metrics=["mae"])
    model.optimizer.build(model.trainable_variables)
    objects = [model, model.layers[0], model.optimizer, keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()),
               keras.losses.MeanSquaredError(), keras.metrics.Mean(), keras.callbacks.History(),
               model.trainable_variables[0], tf.GradientTape(), tf.distribute.get_strategy(),
               tf.Variable(1.0), tf.constant(1.0)]
    names = set()
    for obj in objects:
        for n in set(dir(obj)) | set(getattr(obj, "__dict__", {})):
            if n.startswith("_") and not n.startswith("__"):
                names.add(n)
    return names


def _own_attributes(tree):
    """Names assigned as ``self.<name>`` or defined (``def``, ``class``) in this file: its own, not Keras'."""
    own = {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                and isinstance(node.value, ast.Name) and node.value.id == "self":
            own.add(node.attr)
    return own


def _sources():
    for folder in ("gradtrace", "tests", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path != ADAPTER:
                yield path


def test_private_names_live_only_in_the_adapter():
    private = _private_names()
    assert {"_compute_loss", "_flatten_layers", "_trainable_variables"} <= private  # the check can see them
    found = []
    for path in _sources():
        text = path.read_text()
        tree = ast.parse(text)
        own = _own_attributes(tree)
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.ImportFrom) and any(m in (node.module or "") for m in PRIVATE_MODULES):
                found.append(f"{where}: from {node.module} import ...")
            elif isinstance(node, ast.Import):
                found.extend(f"{where}: import {a.name}" for a in node.names if any(m in a.name for m in PRIVATE_MODULES))
            elif isinstance(node, ast.Attribute):
                if node.attr == "__internal__":
                    found.append(f"{where}: .__internal__")
                elif node.attr in private and node.attr not in own:
                    found.append(f"{where}: .{node.attr}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and path.parent.name != "tests" \
                    and any(f"{m}." in node.value and " " not in node.value for m in PRIVATE_MODULES):
                found.append(f"{where}: {node.value!r}")
    assert not found, "private Keras/TF names outside gradtrace/_keras_compat.py:\n" + "\n".join(found)


def _imports(path):
    """The gradtrace modules ``path`` imports (at any depth: lazy imports count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "gradtrace":
                out.update(f"gradtrace.{a.name}" for a in node.names)
            elif node.module.startswith("gradtrace."):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("gradtrace."))
    return out


def test_the_package_has_no_import_cycle():
    package = ROOT / "gradtrace"
    modules = {}
    for path in package.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        modules[name] = path
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
    # the package itself and the detectors registry re-export modules; edges out of them are not cycles
    graph["gradtrace"] = set()
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert "gradtrace.fit" not in graph["gradtrace.replay"] and "gradtrace.fit" not in graph["gradtrace.actions"]
