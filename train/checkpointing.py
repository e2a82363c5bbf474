"""Training checkpoints: an Orbax CheckpointManager in `run_dir/checkpoints`.

Each step folder holds three items (the layout `mixtral_jax.checkpoint` reads):
`params` (the `param_tree` dict, so inference restores it alone), `opt_state`,
and `train_state`, a JSON file with the step, the RNG key data and the data
iterator's position. Orbax writes a step into a temporary folder, adds
`commit_success.txt` and renames it into place, so a crash mid-save leaves
nothing that looks complete; `latest_step` sees only finished steps.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mixtral_jax import checkpoint
from mixtral_jax.configtools import UserError
from mixtral_jax.train.config import CheckpointConfig
from mixtral_jax.train.step import TrainState

OPT_STATE, TRAIN_STATE = "opt_state", "train_state"


class Checkpointer:
    """Saves and restores TrainState + data position in `run_dir/checkpoints`."""

    def __init__(self, run_dir: str | pathlib.Path, cfg: CheckpointConfig):
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save,
                                               cleanup_tmp_directories=True)  # a killed save's leftovers
        directory = pathlib.Path(run_dir).absolute() / checkpoint.CHECKPOINTS
        self.manager = ocp.CheckpointManager(directory, options=options)

    def latest_step(self) -> int | None:
        """The newest finished step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_state: dict) -> None:
        """Starts saving `state` as `step` (in the background when async). The arrays are
        copied before this returns, so the state may be donated to the next train step."""
        rng = state.rng.addressable_data(0)  # replicated: every process holds all of it
        meta = {"step": step, "rng": [int(x) for x in np.asarray(rng)], "data": data_state}
        self.manager.save(step, force=True, args=ocp.args.Composite(**{
            checkpoint.PARAMS: ocp.args.StandardSave(state.params),
            OPT_STATE: ocp.args.StandardSave(state.opt_state),
            TRAIN_STATE: ocp.args.JsonSave(meta),
        }))

    def restore(self, step: int, like: TrainState) -> tuple[TrainState, dict]:
        """(state, data iterator state) of `step`, placed like `like` (arrays or abstract)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(**{
            checkpoint.PARAMS: ocp.args.StandardRestore(checkpoint.abstract_arrays(like.params)),
            OPT_STATE: ocp.args.StandardRestore(checkpoint.abstract_arrays(like.opt_state)),
            TRAIN_STATE: ocp.args.JsonRestore(),
        }))
        meta = restored[TRAIN_STATE]
        place = lambda value, like_leaf: jax.device_put(jnp.asarray(value, like_leaf.dtype), like_leaf.sharding)
        state = TrainState(place(meta["step"], like.step), restored[checkpoint.PARAMS],
                           restored[OPT_STATE], place(meta["rng"], like.rng))
        return state, meta["data"]

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.close()


def restore_opt_state(path, like):
    """The optimizer state saved in another run's checkpoint (`init_from` with
    `train.reset_optimizer: false`), placed like `like`."""
    _, step_dir = checkpoint.resolve(path)
    if not (step_dir / OPT_STATE).is_dir():
        raise UserError(f"{step_dir} holds no optimizer state (a converted model?); "
                        f"set train.reset_optimizer=true")
    try:
        return ocp.StandardCheckpointer().restore((step_dir / OPT_STATE).absolute(), checkpoint.abstract_arrays(like))
    except (ValueError, KeyError) as err:
        raise UserError(f"{step_dir}: optimizer state does not match this optimizer ({err})") from None
