"""Hugging Face interop: parity with transformers' MixtralForCausalLM, conversion both ways, errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
import yaml
from flax import nnx
from hf_utils import make_hf_model
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import mixtral_jax
from mixtral_jax import hf, moe
from mixtral_jax.checkpoint import param_tree, read_model_config, save_params
from mixtral_jax.cli import main
from mixtral_jax.configtools import UserError
from mixtral_jax.loading import from_params, load
from mixtral_jax.model import Mixtral
from mixtral_jax.tokenizer import model_path

CONFIGS = {
    "base": {},
    "sliding-window": dict(sliding_window=5),  # shorter than SEQ
    "more-layers-than-experts": dict(num_hidden_layers=5, num_local_experts=3),
    "explicit-head-dim": dict(head_dim=16, num_key_value_heads=1, num_local_experts=6, num_experts_per_tok=3),
}
SEQ = 16


def _tokens(vocab_size, seed=0):
    return np.random.default_rng(seed).integers(0, vocab_size, (2, SEQ)).astype(np.int32)


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _tensors(directory):
    """Every tensor in a directory's safetensors files, by name."""
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "np") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_load_balancing_loss_match_transformers(tmp_path, name):
    torch_model, directory = make_hf_model(tmp_path, **CONFIGS[name])
    tokens = _tokens(torch_model.config.vocab_size)
    with torch.no_grad():
        ref = torch_model(torch.tensor(tokens, dtype=torch.long), output_router_logits=True)
    out = load(directory).forward(jnp.asarray(tokens))
    np.testing.assert_allclose(out.logits, ref.logits.numpy(), atol=1e-4, rtol=0)
    c = torch_model.config
    ref_loss = load_balancing_loss_func(ref.router_logits, c.num_local_experts, c.num_experts_per_tok)
    np.testing.assert_allclose(moe.load_balancing_loss(out.aux), ref_loss.item(), atol=1e-5, rtol=0)


def test_sharded_round_trip_is_bit_exact_and_loads_in_transformers(tmp_path):
    torch_model, directory = make_hf_model(tmp_path, max_shard_size="20KB", **CONFIGS["more-layers-than-experts"])
    assert (directory / hf.INDEX_FILE).is_file()
    tokens = _tokens(torch_model.config.vocab_size, seed=1)
    ref = _torch_logits(torch_model, tokens)
    from_hf_dir = np.asarray(load(directory)(tokens))
    np.testing.assert_allclose(from_hf_dir, ref, atol=1e-4, rtol=0)

    ours, back = tmp_path / "ours", tmp_path / "back"
    assert main(["convert", "--from-hf", str(directory), "--out", str(ours)]) == 0
    np.testing.assert_array_equal(load(ours)(tokens), from_hf_dir)
    assert main(["convert", "--checkpoint", str(ours / "checkpoints"), "--to-hf", str(back),
                 "--max-shard-size", "30KB"]) == 0
    assert len(json.loads((back / hf.INDEX_FILE).read_text())["weight_map"]) == len(hf.hf_tensors(
        read_model_config(ours)))
    original, converted = _tensors(directory), _tensors(back)
    assert len(list(back.glob("*.safetensors"))) > 1
    assert original.keys() == converted.keys()
    for name, tensor in original.items():
        assert converted[name].dtype == tensor.dtype and np.array_equal(converted[name], tensor), name

    reloaded = transformers.MixtralForCausalLM.from_pretrained(back, attn_implementation="eager").eval()
    np.testing.assert_allclose(_torch_logits(reloaded, tokens), ref, atol=1e-6, rtol=0)


def test_a_trained_checkpoint_exports_to_transformers(tmp_path):
    config = mixtral_jax.preset("tiny", sliding_window=6)
    rng = np.random.default_rng(3)
    shapes = param_tree(nnx.eval_shape(lambda: Mixtral(config, rngs=nnx.Rngs(0))))
    model = from_params(config, jax.tree_util.tree_map_with_path(  # norms near 1, weights N(0, 0.2)
        lambda path, x: ("norm" in jax.tree_util.keystr(path)) + 0.2 * rng.standard_normal(x.shape), shapes))
    save_params(tmp_path / "run", model)
    hf.convert_to_hf(tmp_path / "run", tmp_path / "hf", progress=False)
    torch_model = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    tokens = _tokens(model.config.vocab_size, seed=2)
    np.testing.assert_allclose(_torch_logits(torch_model.eval(), tokens), model(tokens), atol=1e-4, rtol=0)


def test_bfloat16_stays_bfloat16_and_the_tokenizer_travels(tmp_path):
    _, directory = make_hf_model(tmp_path, dtype=torch.bfloat16, vocab_size=32000)
    tokenizer = model_path("mistral-v1").read_bytes()
    (directory / hf.TOKENIZER_FILE).write_bytes(tokenizer)
    ours, back = tmp_path / "ours", tmp_path / "back"
    hf.convert_from_hf(directory, ours, progress=False)
    config = yaml.safe_load((ours / "config.yaml").read_text())["model"]
    assert config["param_dtype"] == "bfloat16"
    assert config["tokenizer"] == str(ours / hf.TOKENIZER_FILE)
    assert hf.read_hf_config(directory).tokenizer == str((directory / hf.TOKENIZER_FILE).absolute())
    assert load(ours).embed.dtype == jnp.bfloat16

    files = hf.convert_to_hf(ours, back, progress=False)
    assert {f.name for f in files} == {hf.SINGLE_FILE, hf.HF_CONFIG, hf.TOKENIZER_FILE}
    assert (back / hf.TOKENIZER_FILE).read_bytes() == tokenizer
    assert json.loads((back / hf.HF_CONFIG).read_text())["torch_dtype"] == "bfloat16"
    original, converted = _tensors(directory), _tensors(back)
    assert original.keys() == converted.keys()
    for name, tensor in original.items():
        assert converted[name].dtype == tensor.dtype == jnp.bfloat16
        assert np.array_equal(converted[name].view(np.uint16), tensor.view(np.uint16)), name


def test_the_byte_tokenizer_survives_a_round_trip_through_hugging_face(tmp_path, capsys):
    save_params(tmp_path / "run", mixtral_jax.init(mixtral_jax.preset("tiny", vocab_size=272, tokenizer="bytes")))
    files = hf.convert_to_hf(tmp_path / "run", tmp_path / "hf", progress=False)
    assert {f.name for f in files} == {hf.SINGLE_FILE, hf.HF_CONFIG}  # the byte tokenizer has no file
    assert json.loads((tmp_path / "hf" / hf.HF_CONFIG).read_text())[hf.TOKENIZER_KEY] == "bytes"
    assert "note" not in capsys.readouterr().err
    transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf")  # the extra key is harmless there
    capsys.readouterr()
    hf.convert_from_hf(tmp_path / "hf", tmp_path / "back", progress=False)
    assert read_model_config(tmp_path / "back").tokenizer == "bytes"
    assert capsys.readouterr().err == ""
    assert mixtral_jax.load(tmp_path / "hf").config.tokenizer == "bytes"  # read in place too (generate)
    config = json.loads((tmp_path / "hf" / hf.HF_CONFIG).read_text())
    (tmp_path / "hf" / hf.HF_CONFIG).write_text(json.dumps({**config, hf.TOKENIZER_KEY: 5}))
    with pytest.raises(UserError, match=r"config.json: model.tokenizer must be a tokenizer name .* got 5"):
        hf.read_hf_config(tmp_path / "hf")


@pytest.mark.parametrize("vocab_size, tokenizer", [(32768, "mistral-v3"), (32000, "mistral-v1")])
def test_without_tokenizer_model_the_vocabulary_size_picks_mixtrals(tmp_path, capsys, vocab_size, tokenizer):
    _, directory = make_hf_model(tmp_path, vocab_size=vocab_size)
    capsys.readouterr()
    hf.convert_from_hf(directory, tmp_path / "ours", progress=False)
    assert read_model_config(tmp_path / "ours").tokenizer == tokenizer
    note = capsys.readouterr().err
    assert note.count("\n") == 1 and f"no {hf.TOKENIZER_FILE}" in note and repr(tokenizer) in note
    assert hf.read_hf_config(directory).tokenizer == tokenizer  # read in place, the same one


def _drop_tensor(directory):
    tensors = _tensors(directory)
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, directory / hf.SINGLE_FILE, metadata={"format": "pt"})


def _misshape_tensor(directory):
    tensors = _tensors(directory)
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((24, 32), np.float32)
    save_file(tensors, directory / hf.SINGLE_FILE, metadata={"format": "pt"})


def _llama_config(directory):
    config = json.loads((directory / hf.HF_CONFIG).read_text())
    (directory / hf.HF_CONFIG).write_text(json.dumps({**config, "model_type": "llama"}))


@pytest.mark.parametrize("corrupt, message", [
    (_drop_tensor, "tensor model.layers.1.block_sparse_moe.experts.2.w3.weight is missing"),
    (_misshape_tensor, "tensor model.layers.0.self_attn.k_proj.weight has shape [24, 32], "
                       "but config.json implies [16, 32]"),
    (_llama_config, "not a Mixtral config: model_type is 'llama'"),
])
def test_bad_checkpoints_are_one_clear_error(tmp_path, capsys, corrupt, message):
    _, directory = make_hf_model(tmp_path)
    corrupt(directory)
    capsys.readouterr()
    assert main(["convert", "--from-hf", str(directory), "--out", str(tmp_path / "ours")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "ours" / "checkpoints").exists()
    with pytest.raises(Exception, match=message.replace("[", r"\[").replace("]", r"\]")):
        load(directory)


def test_a_missing_hugging_face_directory_is_named_as_missing(tmp_path, capsys):
    assert main(["convert", "--from-hf", str(tmp_path / "nope"), "--out", str(tmp_path / "ours")]) == 2
    assert capsys.readouterr().err == f"mixtral-jax convert: error: {tmp_path / 'nope'}: no such directory\n"


def test_an_output_path_that_is_a_file_is_one_clear_error(tmp_path, capsys):
    _, directory = make_hf_model(tmp_path)
    save_params(tmp_path / "run", mixtral_jax.init(mixtral_jax.preset("tiny"), seed=0))
    (tmp_path / "a-file").write_text("")
    capsys.readouterr()
    for argv, flag in [(["--checkpoint", str(tmp_path / "run"), "--to-hf"], "--to-hf"),
                       (["--from-hf", str(directory), "--out"], "--out")]:
        assert main(["convert", *argv, str(tmp_path / "a-file")]) == 2
        err = capsys.readouterr().err
        assert err == f"mixtral-jax convert: error: {flag} {tmp_path / 'a-file'} is a file, not a folder; name a folder\n"
    assert (tmp_path / "a-file").read_text() == ""
