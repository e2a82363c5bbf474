"""Every bundled run config parses into a valid RunConfig and model config."""

import importlib.resources

import pytest

from mixtral_jax.configtools import UserError, parse_overrides
from mixtral_jax.train.config import load_run_config

BUNDLED = sorted(p.name[:-5] for p in importlib.resources.files("mixtral_jax.configs").iterdir()
                 if p.name.endswith(".yaml"))


def test_the_bundled_configs_are_found():
    assert {"default", "tiny", "bench-tiny", "bench-small"} <= set(BUNDLED)


@pytest.mark.parametrize("name", BUNDLED)
def test_every_bundled_config_parses(name):
    run = load_run_config(name)
    assert run.model_config.num_params > 0
    assert run.train.steps > 0 and run.train.batch_size > 0


def test_dotted_overrides_reach_the_sections():
    run = load_run_config("tiny", ["train.steps=3", "mesh.expert=8", "model.num_hidden_layers=3"])
    assert run.train.steps == 3 and run.mesh.expert == 8
    assert run.model_config.num_hidden_layers == 3


def test_a_config_path_that_is_not_a_yaml_file_is_one_clear_error(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(bytes(range(128, 256)))
    for path, message in [(tmp_path / "binary.yaml", "not a YAML file"),
                          (tmp_path, "is a directory"),
                          (tmp_path / "no" / "tiny.yaml", "not found")]:  # not the bundled tiny.yaml
        with pytest.raises(UserError, match=message):
            load_run_config(str(path))
    assert load_run_config("configs/tiny.yaml").train == load_run_config("tiny").train


@pytest.mark.parametrize("item", ["train.steps", "=3", "train..steps=3"])
def test_malformed_overrides_are_one_clear_error(item):
    with pytest.raises(UserError, match="dotted.key=value"):
        parse_overrides([item])


def test_info_reports_the_presets_counts_and_refuses_a_bad_length(capsys):
    import json

    import mixtral_jax
    from mixtral_jax.cli import main

    # overrides on both sides of an option, bare or under model. as `train` and `plan` take them
    assert main(["info", "--preset", "tiny", "num_hidden_layers=3", "--seq-len", "64", "model.vocab_size=512"]) == 0
    report = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    config = mixtral_jax.preset("tiny", num_hidden_layers=3, vocab_size=512)
    assert report["total_params"] == config.num_params and report["seq_len"] == 64
    assert report["train_flops_per_token"] == config.flops_per_token(64, training=True)
    with pytest.raises(SystemExit):  # argparse's own error: not a key=value setting
        main(["info", "--preset", "tiny", "num_hidden_layers=3", "--seq-len", "64", "stray"])
    capsys.readouterr()
    assert main(["info", "--preset", "tiny", "--seq-len", "-5"]) == 2
    assert capsys.readouterr().err.strip() == "mixtral-jax info: error: --seq-len must be positive, got -5"


def test_a_setting_typed_as_an_option_is_answered_with_its_key_value_word(capsys):
    from mixtral_jax.cli import main
    from mixtral_jax.configtools import field_paths
    from mixtral_jax.infer.runtime import InferenceConfig
    from mixtral_jax.train.config import RunConfig

    assert field_paths(RunConfig, "steps") == ["train.steps"]
    assert field_paths(RunConfig, "seed") == ["data.seed", "train.seed"]
    assert field_paths(InferenceConfig, "expert") == ["mesh.expert"]  # through an optional section
    cases = [
        (["train", "--steps", "3"], "--steps is not an option; settings are KEY=VALUE words: train.steps=3"),
        (["train", "--config", "tiny", "--seed=4"], "--seed=4 is not an option; settings are KEY=VALUE words: "
                                                    "data.seed=4 or train.seed=4"),
        (["generate", "--checkpoint", "run", "--max-new-tokens", "20", "--prompt", "hi"],
         "--max-new-tokens is not an option; settings are KEY=VALUE words: max_new_tokens=20"),
        (["batch", "--checkpoint", "run", "--input", "in", "--output", "out", "seed=1", "--top-p"],
         "--top-p is not an option; settings are KEY=VALUE words: top_p=VALUE"),
        (["eval", "--checkpoint", "run", "--data", "d.jsonl", "--dtype", "bfloat16"],  # the model section's
         "--dtype is not an option; settings are KEY=VALUE words: model.dtype=bfloat16"),
        (["train", "--num-hidden-layers=3"],
         "--num-hidden-layers=3 is not an option; settings are KEY=VALUE words: model.num_hidden_layers=3"),
    ]
    for argv, message in cases:
        assert main(argv) == 2  # before anything loads: the checkpoint and files need not exist
        assert capsys.readouterr().err.strip() == f"mixtral-jax {argv[0]}: error: {message}"
    for argv in (["generate", "--checkpoint", "run", "--prompt", "hi", "--temprature", "0"],  # no such setting
                 ["info", "--preset", "tiny", "--steps", "3"]):  # no run config behind info
        with pytest.raises(SystemExit):  # argparse's own "unrecognized arguments"
            main(argv)
        assert "unrecognized arguments" in capsys.readouterr().err
