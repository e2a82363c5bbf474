"""Training metrics: a console progress bar, `metrics.jsonl` and TensorBoard events.

One `log(step, metrics)` call writes one JSON object (flushed at once, so a
killed run keeps every line it logged), TensorBoard scalars (`train/<key>` and
`expert_load/layer_LL/expert_EE`), and moves the progress bar (ETA, loss, tok/s).
Only the main process writes: `enabled=False` makes every method a no-op.
"""

from __future__ import annotations

import json
import math
import pathlib
import time

import numpy as np

METRICS_FILE = "metrics.jsonl"
_POSTFIX = (("loss", "loss", ".4f"), ("tokens_per_sec", "tok/s", ",.0f"))  # key, label, format


def _plain(value):
    """A JSON-ready copy: arrays to (nested) lists, numpy/JAX scalars to floats, NaN/inf to None."""
    array = np.asarray(value)
    if array.ndim:
        return [_plain(v) for v in array]
    item = array.item()
    if isinstance(item, float) and not math.isfinite(item):
        return None
    return item


def read_metrics(path: str | pathlib.Path) -> list[dict]:
    """The records of a metrics.jsonl, skipping a torn last line (a run killed mid-write)."""
    records = []
    with pathlib.Path(path).open(encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def truncate_after(path: pathlib.Path, step: int) -> None:
    """Drops the records of steps after `step` (they are about to be logged again)."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    tmp.replace(path)


def _summary_writer():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch
    whenever it is installed (seconds at every start) though event files never need it."""
    import sys

    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` fail fast inside tensorboardX
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsLogger:
    """Writes each logged step to the console, `run_dir/metrics.jsonl` and TensorBoard.

    A new run (resume_step None) starts a fresh metrics.jsonl; a resumed run
    keeps the lines up to `resume_step` and drops later ones, so no step
    appears twice (TensorBoard purges them likewise).
    """

    def __init__(self, run_dir: str | pathlib.Path, total_steps: int, enabled: bool = True, *,
                 resume_step: int | None = None):
        self.enabled = enabled
        if not enabled:
            return
        SummaryWriter = _summary_writer()
        from tqdm.auto import tqdm

        run_dir = pathlib.Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / METRICS_FILE
        if resume_step is not None and self.path.exists():
            truncate_after(self.path, resume_step)
        self._file = self.path.open("a" if resume_step is not None else "w", encoding="utf-8")
        purge = None if resume_step is None else resume_step + 1
        self._writer = SummaryWriter(str(run_dir), purge_step=purge, flush_secs=30)
        self._bar = tqdm(total=total_steps, initial=resume_step or 0, unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict) -> None:
        """Records the metrics of `step` (scalars, and `expert_load` as [L][E])."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items() if k != "step"},
                  "time": time.time()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("step", "time"):
                self._writer.add_scalar(f"train/{key}", value, step)
        for layer, loads in enumerate(record.get("expert_load") or []):
            for expert, load in enumerate(loads):
                self._writer.add_scalar(f"expert_load/layer_{layer:02d}/expert_{expert:02d}", load, step)
        shown = [f"{label}={record[key]:{spec}}" for key, label, spec in _POSTFIX
                 if isinstance(record.get(key), (int, float))]
        self._bar.set_postfix_str(", ".join(shown), refresh=False)
        self._bar.update(max(0, step - self._bar.n))

    def close(self) -> None:
        """Flushes and closes the files and the progress bar."""
        if not self.enabled:
            return
        self._bar.close()
        self._file.close()
        self._writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
