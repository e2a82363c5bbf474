"""The one checkpoint format, written by training and by conversion, read by inference.

A checkpoint is a run directory:

    RUN/config.yaml               the resolved run config; its `model:` section spells out every field
    RUN/checkpoints/<step>/       one Orbax CheckpointManager step (written atomically)
        params/                   the model parameters (nested dict of arrays, as `param_tree`)
        opt_state/, train_state/  training only: optimizer state, step, RNG, data iterator

A converted Hugging Face model is a run directory with one step (0) holding
only `params`. Inference accepts the run directory, its checkpoints folder, or
one step folder, and restores only `params`, onto whatever shardings it asks for.
"""

from __future__ import annotations

import contextlib
import pathlib
import sys
import traceback
from typing import Any

import jax
import orbax.checkpoint as ocp
import yaml
from flax import nnx

from mixtral_jax.config import MixtralConfig, from_section
from mixtral_jax.configtools import UserError, read_mapping

PARAMS = "params"
CHECKPOINTS = "checkpoints"
CONFIG_FILE = "config.yaml"
COMMITTED = "commit_success.txt"  # Orbax writes it last into a step folder: the step is complete


def param_tree(model: nnx.Module) -> dict[str, Any]:
    """The model's parameters as a nested dict of arrays (the saved layout)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def abstract_arrays(tree, shardings=None):
    """ShapeDtypeStructs of `tree`'s arrays (concrete or abstract), placed by `shardings` (a
    matching tree) or else where each array is: what to restore, or to compile for, without
    memory."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _latest_step(checkpoints: pathlib.Path) -> pathlib.Path:
    steps = sorted((p for p in checkpoints.iterdir() if p.is_dir() and p.name.isdigit()),
                   key=lambda p: int(p.name))
    complete = [p for p in steps if (p / PARAMS).is_dir() and (p / COMMITTED).is_file()]
    if not complete:
        raise UserError(f"{checkpoints}: no complete checkpoint step found")
    return complete[-1]


def resolve(path: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(run directory, step directory) for a run dir, its checkpoints/ folder, or one step folder.

    The latest complete step is taken unless a step folder is named.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    if (path / CHECKPOINTS).is_dir():
        return path, _latest_step(path / CHECKPOINTS)
    if path.name == CHECKPOINTS:
        return path.parent, _latest_step(path)
    if (path / PARAMS).is_dir() and path.parent.name == CHECKPOINTS:
        return path.parent.parent, path
    raise UserError(f"{path} is not a mixtral-jax checkpoint (expected a run directory with "
                    f"{CHECKPOINTS}/, that folder, or one step folder inside it)")


def read_run_config(run_dir: str | pathlib.Path) -> dict[str, Any]:
    """The run directory's config.yaml as a dict."""
    path = pathlib.Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: no {CONFIG_FILE} beside the checkpoints")
    return read_mapping(path)


def read_model_config(path: str | pathlib.Path) -> MixtralConfig:
    """The model config of the checkpoint at `path` (any form `resolve` accepts)."""
    run_dir, _ = resolve(path)
    return from_section(read_run_config(run_dir).get("model"))


def write_run_config(run_dir: str | pathlib.Path, run_config: dict[str, Any]) -> None:
    """Writes config.yaml (the model section is expanded to every field)."""
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_config = dict(run_config)
    model = run_config.get("model")
    if isinstance(model, MixtralConfig):
        run_config["model"] = model.to_dict()
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(run_config, sort_keys=False))


def save_params(run_dir: str | pathlib.Path, model: nnx.Module) -> pathlib.Path:
    """Writes `model` (built or changed in Python) as a params-only run directory that
    `generate`, `batch`, `eval` and `init_from` read; returns its step folder (step 0)."""
    run_dir = pathlib.Path(run_dir).absolute()
    if (run_dir / CHECKPOINTS).exists():  # Orbax would keep the step 0 already there
        raise UserError(f"{run_dir} already holds {CHECKPOINTS}/; save into a new directory")
    write_run_config(run_dir, {"model": model.config})
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(run_dir / CHECKPOINTS, options=options) as manager:
        manager.save(0, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardSave(param_tree(model))}))
    return run_dir / CHECKPOINTS / "0"


def param_shapes(tree) -> dict[str, tuple[int, ...]]:
    """{"layers/attn/k": shape} for every array (or array metadata) leaf of a parameter tree."""
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {"/".join(str(getattr(key, "key", key)) for key in path): tuple(leaf.shape) for path, leaf in leaves}


def shape_mismatch(found: dict, wanted: dict, where: str) -> str | None:
    """The first parameter whose shape in `found` is not the model's in `wanted` ({name: shape},
    as `param_shapes` gives), in words naming `where` found came from; None when they agree."""
    for name in sorted(found.keys() | wanted.keys()):
        if name not in wanted:
            return f"{name} is in {where} but not in the model"
        if found.get(name) != wanted[name]:
            got = f"is {found[name]}" if name in found else "is missing"
            return f"{name} {got} in {where}, {wanted[name]} in the model"
    return None


def _is_closed_loop_report(report) -> bool:
    """Whether an unraisable-exception report is a callback's `call_soon_threadsafe` into a
    closed event loop."""
    return (report.object is None and isinstance(report.exc_value, RuntimeError)
            and str(report.exc_value) == "Event loop is closed"
            and "call_soon_threadsafe" in (frame.name for frame in traceback.extract_tb(report.exc_traceback)))


def _closed_loop_filter(previous):
    """An unraisable-exception hook that drops `_is_closed_loop_report`s and hands every other
    report to `previous` (kept as its `.previous_unraisablehook`)."""
    def hook(report):
        if not _is_closed_loop_report(report):
            previous(report)

    hook.previous_unraisablehook = previous
    return hook


@contextlib.contextmanager
def _readable(step_dir: pathlib.Path):
    """A failed read of the stored parameters as one UserError line: the root cause's first line,
    which names the array (Orbax wraps tensorstore's error, kilobytes with its spec).

    Orbax runs a restore in an event loop of its own and closes it when the first
    read fails; tensorstore's callbacks for the reads still in flight then call into
    the closed loop from its threads, and each RuntimeError goes to
    `sys.unraisablehook`: a dozen tracebacks on stderr after the one-line error.
    While reading, and for good after a failed read, those reports are dropped;
    every other one goes to the hook installed before.
    """
    installed = None
    if not hasattr(sys.unraisablehook, "previous_unraisablehook"):
        installed = sys.unraisablehook = _closed_loop_filter(sys.unraisablehook)
    try:
        yield
    except Exception as err:  # noqa: BLE001 -- the wrapper is a bare Exception
        while err.__cause__ is not None:
            err = err.__cause__
        detail = (str(err).splitlines() or [type(err).__name__])[0].split(" [tensorstore_spec=")[0][:300]
        raise UserError(f"{step_dir}: parameters unreadable: damaged, or not of the model config ({detail})") from None
    else:  # every read finished: no callback is left to report
        if installed is not None and sys.unraisablehook is installed:
            sys.unraisablehook = installed.previous_unraisablehook


def _check_shapes(step_dir: pathlib.Path, target) -> None:
    """UserError naming the first parameter whose stored shape is not the target's."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        with _readable(step_dir):
            stored = param_shapes(handler.metadata((step_dir / PARAMS).absolute()))
    finally:
        handler.close()
    mismatch = shape_mismatch(stored, param_shapes(target), "the checkpoint")
    if mismatch:
        raise UserError(f"{step_dir}: parameters do not match the model config: {mismatch}")


def restore_params(path: str | pathlib.Path, model: nnx.Module) -> nnx.Module:
    """Restores the parameters at `path` into `model` (abstract or concrete), keeping its shardings.

    The target's shapes and dtypes decide what is read, so a checkpoint can
    land on any mesh; a shape that disagrees with the config is an error.
    """
    _, step_dir = resolve(path)
    state = nnx.state(model, nnx.Param)
    target = abstract_arrays(nnx.to_pure_dict(state))
    _check_shapes(step_dir, target)  # before reading: a failed read leaves tracebacks at exit
    with _readable(step_dir):
        restored = ocp.StandardCheckpointer().restore((step_dir / PARAMS).absolute(), target)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return model


def load_checkpoint(path: str | pathlib.Path, **config_changes) -> nnx.Module:
    """A model restored from a mixtral-jax checkpoint on the default device."""
    from mixtral_jax.model import Mixtral

    config = read_model_config(path)
    if config_changes:
        config = config.replace(**config_changes)
    model = nnx.eval_shape(lambda: Mixtral(config, rngs=nnx.Rngs(0)))
    return restore_params(path, model)
