"""Snapshots of a failing step: written atomically, read back as data, never as code.

A snapshot is one directory, ``<snapshot_dir>/step_00000037``:

- ``manifest.json``: format version, gradtrace/TensorFlow/Keras versions, the
  step, epoch, model name, the anomalies of the step, the detector names, the
  structure of the batch, and the list of files,
- ``batch.npz``: the batch exactly as the step saw it (inputs, targets, sample
  weights; lists, tuples, dicts and None kept in the manifest's ``batch`` spec),
- ``model.weights.h5``: the weights before the step's update (Keras' own format),
- ``state.npz``: every model variable (seed generator states and BatchNorm
  statistics included) and every optimizer variable, by position, with their
  paths and shapes in the manifest,
- ``stats.npz``: the step's packed statistics; ``rows.json``: their rows,
- ``model.json`` and ``compile.json``: the architecture and compile
  configuration, where Keras can serialise them.

The directory is written under a temporary name and renamed at the end, so it
appears whole or not at all. Arrays are loaded with ``allow_pickle=False``;
JSON is plain data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
# absent in snapshots written before them: your own loop's step function (gradtrace.loop), the replicas
# the step ran on (a distribution strategy's)
OPTIONAL_KEYS = frozenset({"own_step", "replicas"})
MANIFEST_KEYS = frozenset(
    {"format", "format_version", "gradtrace", "tensorflow", "keras", "step", "epoch", "model", "anomalies",
     "detectors", "batch", "files", "variables", "optimizer_variables", "has_architecture", "has_compile_config"}
)
FILES = ("manifest.json", "batch.npz", "model.weights.h5", "state.npz", "stats.npz", "rows.json")
DEFAULT_DIR = "gradtrace_snapshots"


class SnapshotError(ValueError):
    """A snapshot that cannot be read or written; the message says what and why."""


# -- the batch's structure ---------------------------------------------------------------------

def _encode(value, arrays):
    if value is None:
        return {"t": "none"}
    if isinstance(value, dict):
        keys = sorted(value)
        for k in keys:
            if not isinstance(k, str):
                raise SnapshotError(f"batch dict keys must be strings to be saved, got {k!r}")
        return {"t": "dict", "keys": keys, "items": [_encode(value[k], arrays) for k in keys]}
    if isinstance(value, (list, tuple)):
        return {"t": type(value).__name__, "items": [_encode(v, arrays) for v in value]}
    if hasattr(value, "numpy"):
        import tensorflow as tf

        if isinstance(value, tf.RaggedTensor):
            key = f"a{len(arrays)}"
            arrays[key] = value.flat_values.numpy()
            splits = [s.numpy() for s in value.nested_row_splits]
            skeys = []
            for s in splits:
                sk = f"a{len(arrays)}"
                arrays[sk] = s
                skeys.append(sk)
            return {"t": "ragged", "key": key, "splits": skeys}
        if isinstance(value, tf.SparseTensor):
            raise SnapshotError("sparse tensors in the batch cannot be snapshotted yet")
        value = value.numpy()
    arr = np.asarray(value)
    if arr.dtype == object:
        raise SnapshotError("the batch holds Python objects, which a snapshot cannot store without pickle")
    key = f"a{len(arrays)}"
    arrays[key] = arr
    return {"t": "array", "key": key}


def _decode(spec, arrays):
    t = spec.get("t")
    if t == "none":
        return None
    if t == "dict":
        return {k: _decode(v, arrays) for k, v in zip(spec["keys"], spec["items"])}
    if t in ("list", "tuple"):
        items = [_decode(v, arrays) for v in spec["items"]]
        return items if t == "list" else tuple(items)
    if t == "array":
        return arrays[spec["key"]]
    if t == "ragged":
        import tensorflow as tf

        return tf.RaggedTensor.from_nested_row_splits(arrays[spec["key"]], [arrays[k] for k in spec["splits"]])
    raise SnapshotError(f"unknown entry {t!r} in the manifest's batch spec")


# -- writing -----------------------------------------------------------------------------------

def write(directory, *, model, data, step, epoch, anomalies, detectors, table, matrix, optimizer=None,
          own_step=None) -> str:
    """Write one snapshot atomically and return its path. ``optimizer``: the one the step applies (default
    ``model.optimizer``); ``own_step``: the name of your own loop's step function (``gradtrace.loop``),
    whose arguments ``data`` holds: replay then needs that function."""
    import keras
    import tensorflow as tf

    import gradtrace

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    n = 1
    while final.exists():
        n += 1
        final = root / f"step_{step:08d}_{n}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        arrays = {}
        spec = _encode(data, arrays)
        np.savez(tmp / "batch.npz", **arrays)
        model.save_weights(str(tmp / "model.weights.h5"))
        from gradtrace.capturing import variable_paths

        named = variable_paths(model)
        variables = [v for _, v in named]
        opt_vars = list((optimizer or model.optimizer).variables)
        np.savez(
            tmp / "state.npz",
            **{f"v{i}": np.asarray(v.numpy()) for i, v in enumerate(variables)},
            **{f"o{i}": np.asarray(v.numpy()) for i, v in enumerate(opt_vars)},
        )
        np.savez(tmp / "stats.npz", matrix=np.asarray(matrix, np.float32))
        (tmp / "rows.json").write_text(json.dumps([dataclasses.asdict(r) for r in table.rows], default=list))
        has_arch = has_compile = False
        try:
            (tmp / "model.json").write_text(model.to_json())
            has_arch = True
        except Exception:  # subclassed models without get_config: replay needs model=
            pass
        try:
            (tmp / "compile.json").write_text(json.dumps(keras.saving.serialize_keras_object(model.get_compile_config())))
            has_compile = True
        except Exception:
            pass
        manifest = {
            "format": "gradtrace-snapshot",
            "format_version": FORMAT_VERSION,
            "gradtrace": gradtrace.__version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "step": int(step),
            "epoch": int(epoch),
            "model": model.name,
            "anomalies": [
                {k: v for k, v in a.to_dict().items() if k not in ("snapshot", "snapshot_error")} for a in anomalies
            ],
            "detectors": list(detectors),
            "batch": spec,
            "files": sorted(p.name for p in tmp.iterdir()) + ["manifest.json"],
            "variables": [[p, list(v.shape)] for p, v in named],
            "optimizer_variables": [[v.path, list(v.shape)] for v in opt_vars],
            "has_architecture": has_arch,
            "has_compile_config": has_compile,
            "own_step": own_step,
            "replicas": int(getattr(getattr(model, "distribute_strategy", None), "num_replicas_in_sync", 1) or 1),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=_json_default))
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(final)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON data")


# -- reading -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Snapshot:
    path: str
    manifest: dict
    data: object
    variables: list
    optimizer_variables: list
    matrix: np.ndarray
    rows: list

    @property
    def step(self):
        return self.manifest["step"]


def _inside(root: Path, name: str) -> Path:
    """``root/name``, refusing names that leave ``root`` (``..``, absolute paths, symlinks)."""
    p = root / name
    if os.path.isabs(name) or ".." in Path(name).parts or p.is_symlink():
        raise SnapshotError(f"{root}: {name!r} points outside the snapshot directory; refusing to read it")
    real = p.resolve()
    if root.resolve() not in real.parents:
        raise SnapshotError(f"{root}: {name!r} points outside the snapshot directory; refusing to read it")
    return p


def _load_npz(root, name):
    p = _inside(root, name)
    if not p.is_file():
        raise SnapshotError(f"{root}: {name} is missing; the snapshot is partial")
    try:
        with open(p, "rb") as fh, np.load(fh, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise SnapshotError(f"{root}: {name} holds pickled objects; gradtrace never unpickles") from None
        raise SnapshotError(f"{root}: {name} is corrupted ({e})") from None
    except Exception as e:
        raise SnapshotError(f"{root}: {name} is corrupted or truncated ({type(e).__name__}: {e})") from None


def _load_json(root, name):
    p = _inside(root, name)
    if not p.is_file():
        raise SnapshotError(f"{root}: {name} is missing; the snapshot is partial")
    try:
        return json.loads(p.read_text())
    except Exception as e:
        raise SnapshotError(f"{root}: {name} is not valid JSON ({e}); the file is corrupted or truncated") from None


def note_verification(path, anomalies):
    """Add the verdicts of ``verify_hints`` (found after the snapshot was written) to its manifest's anomalies;
    the manifest is replaced whole (written beside it, then renamed over it)."""
    root = Path(path)
    manifest = read_manifest(root)
    verdicts = {(a.detector, a.layer, a.step): a for a in anomalies if a.verification}
    for entry in manifest["anomalies"]:
        a = verdicts.get((entry.get("detector"), entry.get("layer"), entry.get("step")))
        if a is not None:
            entry["verified"], entry["verification"] = a.verified, a.verification
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, default=_json_default))
    os.replace(tmp, root / "manifest.json")


def read_manifest(path) -> dict:
    root = Path(path)
    if not root.exists():
        raise SnapshotError(f"{root}: no such snapshot directory")
    if not root.is_dir():
        raise SnapshotError(f"{root}: not a snapshot directory (a snapshot is a directory holding manifest.json)")
    manifest = _load_json(root, "manifest.json")
    if not isinstance(manifest, dict) or manifest.get("format") != "gradtrace-snapshot":
        raise SnapshotError(f"{root}: manifest.json is not a gradtrace snapshot manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise SnapshotError(
            f"{root}: snapshot format version {version!r} is not supported by this gradtrace "
            f"(it reads version {FORMAT_VERSION}); use the gradtrace version that wrote it ({manifest.get('gradtrace')})"
        )
    keys = set(manifest) - OPTIONAL_KEYS
    if keys != MANIFEST_KEYS:
        extra, missing = sorted(keys - MANIFEST_KEYS), sorted(MANIFEST_KEYS - keys)
        raise SnapshotError(f"{root}: manifest.json has unexpected keys {extra} and lacks {missing}")
    for name in manifest["files"]:
        if not isinstance(name, str):
            raise SnapshotError(f"{root}: manifest lists a file name that is not a string: {name!r}")
        _inside(root, name)
    for name in FILES:
        if not _inside(root, name).is_file():
            raise SnapshotError(f"{root}: {name} is missing; the snapshot is partial")
    return manifest


def load(path) -> Snapshot:
    """Read a snapshot as data (no pickle, no code), validating it first."""
    root = Path(path)
    manifest = read_manifest(root)
    arrays = _load_npz(root, "batch.npz")
    data = _decode(manifest["batch"], arrays)
    state = _load_npz(root, "state.npz")
    try:
        variables = [state[f"v{i}"] for i in range(len(manifest["variables"]))]
        opt = [state[f"o{i}"] for i in range(len(manifest["optimizer_variables"]))]
    except KeyError as e:
        raise SnapshotError(f"{root}: state.npz lacks {e}; the snapshot is partial or corrupted") from None
    stats = _load_npz(root, "stats.npz")
    if "matrix" not in stats:
        raise SnapshotError(f"{root}: stats.npz lacks the statistics matrix")
    rows = _load_json(root, "rows.json")
    return Snapshot(str(root), manifest, data, variables, opt, stats["matrix"], rows)


# classes of the live models whose snapshots were written in this process, so that
# replay works without custom_objects in the same process (custom layers included)
_LIVE_CLASSES: dict = {}


def remember_classes(path, model):
    from gradtrace import _keras_compat as compat

    classes = {type(model).__name__: type(model)}
    for layer in compat.all_layers(model):
        classes[type(layer).__name__] = type(layer)
    _LIVE_CLASSES[os.path.abspath(path)] = classes


def live_classes(path) -> dict:
    """The classes of the model whose snapshot is at ``path``, when it was written in this process."""
    return dict(_LIVE_CLASSES.get(os.path.abspath(path), {}))
