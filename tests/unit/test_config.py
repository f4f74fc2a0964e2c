import pytest

from emdpo_ray.config import ConfigError, load_config


def test_defaults_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: 3\ndpo:\n  beta: 0.5\nem:\n  max_iterations: 2\n")
    cfg = load_config(str(f), ["dpo.beta=0.25", "em.warm_start=false", "model.lora.r=4"])
    assert (cfg.seed, cfg.dpo.beta, cfg.em.max_iterations) == (3, 0.25, 2)
    assert cfg.em.warm_start is False and cfg.model.lora.r == 4


@pytest.mark.parametrize("sets,expect", [
    (["dpo.betta=1"], "dpo.betta: unknown key"),
    (["dpo.beta=-1"], "dpo.beta: Input should be greater than 0"),
    (["em.init=spectral"], "em.init: Input should be 'kmeans', 'random' or 'labels'"),
    (["ray.zero_stage=4"], "ray.zero_stage"),
    (["model.lora.dropout=0.1"], "model.lora.dropout must be 0"),
    (["nonsense"], "expected dotted.key=value"),
])
def test_bad_values_name_the_key(sets, expect):
    with pytest.raises(ConfigError) as e:
        load_config(None, sets)
    assert expect in str(e.value)


def test_bad_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("dpo: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(f))
    f.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(f))
    with pytest.raises(ConfigError, match="no such config"):
        load_config(str(tmp_path / "missing.yaml"))


def test_cli_help_lists_subcommands_and_knobs():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "emdpo_ray", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for cmd in ("synth", "types", "train", "mmra", "eval", "serve"):
        assert cmd in out
    out = subprocess.run([sys.executable, "-m", "emdpo_ray", "train", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for knob in ("--data", "--types", "--out", "--config", "--set", "dpo.beta", "em.init",
                 "ray.zero_stage"):
        assert knob in out
    # every default the help shows is the configuration's default
    import functools
    import re

    shown = re.findall(r"\b([a-z_]+(?:\.[a-z_]+)+)=(\S+)", out.split("defaults shown")[1])
    assert len(shown) >= 18, shown
    cfg = load_config(None)
    forms = []
    for key, text in shown:
        actual = functools.reduce(getattr, key.split("."), cfg)
        if "|" in text:
            choices = text.split("|")
            if any(c.isupper() for c in choices):  # the forms a value takes (DIR|HF_ID|...)
                forms.append(key)
            else:  # a choice list shows the default first
                assert choices[0] == str(actual), key
            continue
        if isinstance(actual, bool):
            assert text == str(actual).lower(), key
        else:
            assert float(text) == float(actual), key
    assert forms == ["model.name_or_path"]


def test_generations_are_as_long_as_the_training_responses_unless_capped():
    assert load_config(None, ["data.max_response_tokens=40"]).generation_tokens == 40
    assert load_config(None, ["mmra.max_new_tokens=12"]).generation_tokens == 12


def test_start_features_train_a_copy_further_only_for_the_tiny_model_by_default():
    assert load_config(None, []).start_sft_passes == 1.0
    assert load_config(None, ["model.name_or_path=some/model"]).start_sft_passes == 0.0
    assert load_config(None, ["em.init_sft_epochs=0"]).start_sft_passes == 0.0
    assert load_config(None, ["model.name_or_path=m", "em.init_sft_epochs=1.5"]).start_sft_passes == 1.5


def test_the_start_l2_path_is_stronger_for_the_language_models_wide_features_by_default():
    assert load_config(None, []).start_l2s == (1e-2, 1e-3, 1e-4)
    for features in ("language", "reference_by_prompt_state"):
        assert load_config(None, [f"em.init_features={features}"]).start_l2s == (
            1.0, 0.1, 1e-2, 1e-3, 1e-4)
    # a path given is used as given, whatever the features
    assert load_config(None, ["em.init_features=language", "em.init_l2=[0.5, 0.05]"]
                       ).start_l2s == (0.5, 0.05)
    with pytest.raises(ConfigError, match="em.init_l2"):
        load_config(None, ["em.init_l2=[]"])
