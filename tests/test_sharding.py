"""Meshes, the logical-rules table (golden partition specs), sharded init and restore, batches,
multi-host settings. Eight simulated CPU devices (tests/conftest.py)."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import mixtral_jax
from mixtral_jax import checkpoint, cli, sharding
from mixtral_jax.configtools import UserError
from mixtral_jax.sharding import DistributedConfig, MeshConfig

GOLDEN = pathlib.Path(__file__).parent / "golden"


def spec_table(config) -> dict:
    """{param path: {"shape", "spec"}} of a preset's parameters in the parameter view (no memory)."""
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
    model = sharding.abstract_model(config, mesh)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(str(k.key) for k in path): {"shape": list(leaf.shape),
                                                 "spec": [list(a) if isinstance(a, tuple) else a
                                                          for a in leaf.sharding.spec]}
            for path, leaf in flat}


@pytest.mark.parametrize("preset", ["mixtral-8x7b", "mixtral-8x22b"])
def test_golden_partition_specs(preset):
    """The parameter view of the full presets matches the checked-in table
    (regenerate with MIXTRAL_UPDATE_GOLDEN=1 after a deliberate change)."""
    table = spec_table(mixtral_jax.preset(preset))
    path = GOLDEN / f"{preset}.json"
    if os.environ.get("MIXTRAL_UPDATE_GOLDEN"):
        path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    assert table == json.loads(path.read_text())
    # the spots that matter: experts over expert, FSDP on embed, tensor on heads / ffn / vocab
    assert table["layers/moe/w_gate"]["spec"] == [None, "expert", "fsdp", "tensor"]
    assert table["layers/attn/k"]["spec"] == [None, "fsdp", "tensor", None]
    assert table["embed"]["spec"] == ["tensor", "fsdp"]


def test_rules_views():
    """FSDP is the compute view plus embed -> fsdp; tokens are split over data, fsdp and expert."""
    assert sharding.logical_to_spec(("batch", "seq", "embed")) == P(("data", "fsdp", "expert"), None, None)
    assert sharding.logical_to_spec(("expert", "embed", "mlp"), sharding.PARAM_RULES) == P("expert", "fsdp", "tensor")
    differ = {n for (n, a), (_, b) in zip(sharding.COMPUTE_RULES, sharding.PARAM_RULES) if a != b}
    assert differ == {"embed"}
    with pytest.raises(ValueError, match="'heads_typo'"):
        sharding.logical_to_spec(("heads_typo",))


def test_make_mesh_shapes_and_errors():
    mesh = sharding.make_mesh(MeshConfig(data=-1, expert=4))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    with pytest.raises(UserError, match="needs 16 devices, but 8 are available"):
        sharding.make_mesh(MeshConfig(data=2, fsdp=2, expert=4))
    with pytest.raises(UserError, match="only one axis may be -1"):
        sharding.make_mesh(MeshConfig(data=-1, expert=-1))
    with pytest.raises(UserError, match="not a multiple"):
        sharding.make_mesh(MeshConfig(data=-1, expert=3))


def test_check_divisible_names_every_problem():
    config = mixtral_jax.preset("tiny")  # 8 experts, 4 heads, 2 kv heads, ffn 96, vocab 256, hidden 64
    sharding.check_divisible(sharding.make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2)), config, 8)
    three = sharding.make_mesh(MeshConfig(data=1, expert=3), devices=jax.devices()[:3])
    with pytest.raises(UserError, match=r"num_local_experts=8 is not divisible by mesh.expert=3"):
        sharding.check_divisible(three, config)
    tensor4 = sharding.make_mesh(MeshConfig(data=2, tensor=4))
    with pytest.raises(UserError, match=r"num_key_value_heads=2 is not divisible by mesh.tensor=4"):
        sharding.init_model(config, tensor4)  # before anything compiles
    with pytest.raises(UserError, match=r"batch size 6 is not divisible by data x fsdp x expert = 4"):
        sharding.check_divisible(sharding.make_mesh(MeshConfig(data=4, tensor=2)), config, 6)


@pytest.fixture(scope="module")
def sharded_tiny():
    """A one-layer tiny model initialised straight onto an (fsdp=2, expert=2, tensor=2) mesh."""
    config = mixtral_jax.preset("tiny", num_hidden_layers=1)
    return sharding.init_model(config, sharding.make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2)), seed=3)


def test_init_model_is_sharded_and_equals_single_device_init(sharded_tiny):
    w_gate = sharded_tiny.layers.moe.w_gate[...]  # [L, E, D, F] = [1, 8, 64, 96]
    assert w_gate.sharding.spec == P(None, "expert", "fsdp", "tensor")
    assert {s.data.shape for s in w_gate.addressable_shards} == {(1, 4, 32, 48)}  # 1/8 per device
    # the same numbers as the same jitted init on one device (eager init rounds differently: 1 ulp)
    single = jax.jit(lambda: checkpoint.param_tree(mixtral_jax.init(sharded_tiny.config, seed=3)))()
    jax.tree.map(np.testing.assert_array_equal, checkpoint.param_tree(sharded_tiny), single)


def test_restore_onto_a_different_mesh(sharded_tiny, tmp_path):
    checkpoint.save_params(tmp_path / "run", sharded_tiny)
    other = sharding.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    model = sharding.restore_model(tmp_path / "run", other, moe_impl="reference")
    assert model.config.moe_impl == "reference"
    router = model.layers.moe.router[...]  # [L, D, E]: (layers, embed, None)
    assert router.sharding.mesh == other and router.sharding.spec == P(None, "fsdp", None)
    assert {s.data.shape for s in model.embed[...].addressable_shards} == {(128, 16)}  # vocab/2, embed/4
    jax.tree.map(np.testing.assert_array_equal, checkpoint.param_tree(model), checkpoint.param_tree(sharded_tiny))
    with pytest.raises(UserError, match="not divisible by mesh.expert=3"):
        sharding.restore_model(tmp_path / "run", sharding.make_mesh(MeshConfig(data=1, expert=3),
                                                                    devices=jax.devices()[:3]))


def test_shard_batch_and_param_shardings():
    mesh = sharding.make_mesh(MeshConfig(data=2, expert=2, tensor=2))
    rows = np.arange(8 * 5, dtype=np.int32).reshape(8, 5)
    batch = sharding.shard_batch({"inputs": rows, "weights": np.ones(8, np.float32)}, mesh)
    assert batch["inputs"].sharding.spec == P(("data", "fsdp", "expert"), None)
    assert {s.data.shape for s in batch["inputs"].addressable_shards} == {(2, 5)}
    np.testing.assert_array_equal(np.asarray(batch["inputs"]), rows)
    assert batch["weights"].shape == (8,)
    with pytest.raises(UserError, match="inputs: 6 rows are not divisible by data x fsdp x expert = 4"):
        sharding.shard_batch({"inputs": rows[:6]}, mesh)
    abstract = sharding.abstract_model(mixtral_jax.preset("tiny"), mesh)
    shardings = nnx.to_pure_dict(sharding.param_shardings(abstract, mesh))
    assert shardings["lm_head"].spec == P("fsdp", "tensor")


def test_initialize_distributed_settings():
    sharding.initialize_distributed(DistributedConfig())  # single process: nothing to do
    sharding.initialize_distributed(DistributedConfig(num_processes=1))
    assert sharding.is_main_process()
    with pytest.raises(UserError, match="distributed.process_id must be set"):
        sharding.initialize_distributed(DistributedConfig(coordinator="127.0.0.1:1234", num_processes=2))
    with pytest.raises(UserError, match=r"process_id=2 is not in \[0, num_processes=2\)"):
        sharding.initialize_distributed(DistributedConfig("127.0.0.1:1234", 2, 2))


def test_plan_tiny_on_eight_devices(capsys):
    """`mixtral-jax plan` compiles the real train step and a decode step for the mesh and
    reports per-device bytes: experts 1/8 per device, AdamW's two moments like the parameters."""
    assert cli.main(["plan", "--preset", "tiny", "--devices", "8", "--seq-len", "32",
                     "mesh.data=1", "mesh.expert=8"]) == 0
    report = json.loads(capsys.readouterr().out)
    config = mixtral_jax.preset("tiny")
    experts = 3 * config.num_hidden_layers * config.num_local_experts * config.hidden_size * config.intermediate_size
    train = report["train"]
    assert train["parameters"] == 4 * (config.num_params - experts + experts // 8)
    assert 0 <= train["optimizer_state"] - 2 * train["parameters"] <= 16  # + step counters
    assert train["temporaries"] > 0 and train["total"] >= train["parameters"] + train["temporaries"]
    assert train["fits"] == {"tpu-v5e": True, "h100": True, "tpu-v5p": True}
    assert report["decode"]["kv_cache"] > 0 and report["batch_size"] == 8
    assert cli.main(["plan", "--preset", "tiny", "--devices", "8", "mesh.tensor=8"]) == 2
    assert "num_key_value_heads=2 is not divisible by mesh.tensor=8" in capsys.readouterr().err
    assert cli.main(["plan", "--preset", "tiny", "--devices", "8", "--seq-len", "100000"]) == 2
    assert "seq_len (100000) exceeds model.max_position_embeddings (512)" in capsys.readouterr().err
