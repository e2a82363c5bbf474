"""The one table from the model's logical axis names to mesh axes.

Two views of the same table (levanter's split): the compute view places
activations and the weights as the math consumes them; the parameter view is
the compute view plus `embed -> fsdp`, which is all FSDP is: parameters (and
so optimizer state) are stored split over `fsdp` and gathered for compute.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with sharded
parameters), `expert` (experts split across devices; data parallel outside the
MoE), `tensor` (attention heads and the FFN hidden dimension split).
"""

from __future__ import annotations

from jax.sharding import PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # tokens outside the MoE are split over all three

COMPUTE_RULES = (
    ("batch", BATCH_AXES),
    ("seq", None),
    ("embed", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("norm", None),
    ("layers", None),
)
PARAM_RULES = tuple((name, "fsdp" if name == "embed" else axes) for name, axes in COMPUTE_RULES)


def logical_to_spec(axes: tuple[str | None, ...], rules=COMPUTE_RULES) -> PartitionSpec:
    """PartitionSpec for a tensor whose dimensions carry these logical names (None: not split)."""
    table = dict(rules)
    unknown = [a for a in axes if a is not None and a not in table]
    if unknown:
        raise ValueError(f"logical axis {unknown[0]!r} has no sharding rule")
    return PartitionSpec(*(None if a is None else table[a] for a in axes))
