"""The end-of-run picture: loss curves and where the router sent the tokens."""

from __future__ import annotations

import pathlib

import numpy as np

from mixtral_jax.configtools import UserError
from mixtral_jax.train.metrics import METRICS_FILE, read_metrics

PLOT_FILE = "training.png"


def plot_run(run_dir: str | pathlib.Path, last: int = 5) -> pathlib.Path:
    """Writes `run_dir/training.png` from its metrics.jsonl and returns the path.

    Left: loss and (right axis) aux loss against step. Right: an experts x
    layers heatmap of the expert load, averaged over the last `last` records
    that have one.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = pathlib.Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: nothing to plot")
    records = [r for r in read_metrics(path) if r.get("loss") is not None]
    if not records:
        raise UserError(f"{path} holds no logged loss: nothing to plot")

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    curves, heat = figure.subplots(1, 2, width_ratios=(3, 2))
    marker = "o" if len(records) <= 30 else None
    lines = curves.plot([r["step"] for r in records], [r["loss"] for r in records], color="tab:blue",
                        marker=marker, label="loss")
    curves.set(xlabel="step", ylabel="loss", title="training loss")
    aux = [(r["step"], r["aux_loss"]) for r in records if r.get("aux_loss") is not None]
    if aux:
        aux_axis = curves.twinx()
        lines += aux_axis.plot(*zip(*aux), color="tab:orange", marker=marker, linestyle="--",
                               label="aux loss (right)")
        aux_axis.set_ylabel("aux (load-balancing) loss", color="tab:orange")
    curves.legend(handles=lines, loc="upper right")
    curves.grid(alpha=0.3)

    loads = [np.asarray(r["expert_load"], float) for r in records if r.get("expert_load")][-last:]
    if loads:
        load = np.mean(loads, axis=0).T  # [E, L]
        image = heat.imshow(load, cmap="viridis", aspect="auto", origin="lower")
        figure.colorbar(image, ax=heat, label="share of routed tokens")
        heat.set(xlabel="layer", ylabel="expert", xticks=range(load.shape[1]), yticks=range(load.shape[0]),
                 title=f"expert load (last {len(loads)} logged steps)")
        if load.size <= 128:
            bright = load > (load.min() + load.max()) / 2  # dark text on the bright cells
            for (expert, layer), value in np.ndenumerate(load):
                heat.text(layer, expert, f"{value:.2f}", ha="center", va="center", fontsize=7,
                          color="k" if bright[expert, layer] else "w")
    else:
        heat.set_axis_off()
        heat.text(0.5, 0.5, "no expert load logged", ha="center", va="center")

    out = run_dir / PLOT_FILE
    figure.savefig(out, dpi=110)
    return out
