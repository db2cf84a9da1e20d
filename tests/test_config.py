"""ctxjax.config: defaults, YAML presets, dotted overrides, and errors that name what is wrong."""

import dataclasses
import json
import logging
import os
import subprocess
import sys

import pytest

from ctxjax.config import (
    LossConfig,
    RunConfig,
    from_dict,
    load_config,
    parse_overrides,
    to_dict,
    to_json,
)
from ctxjax.model import Numerics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_load():
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.loss.opd == "reverse_kl_topk" and cfg.loss.beta == 0.5
    assert cfg.task.name == "synthetic" and cfg.task.options == RunConfig().task.options
    assert '"beta": 0.5' in to_json(cfg)


def _write(tmp_path, text, name="preset.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_yaml_preset_then_overrides(tmp_path):
    path = _write(
        tmp_path,
        """
loss:
  beta: 1          # an int where a float is expected: coerced
  opd: jsd
optim:
  learning_rate: 3e-4
task:
  context: hint
  options: {sloppy_rate: 0.5, families: [sum, max]}
data:
  batch_size: 8
""",
    )
    cfg = load_config(
        path,
        [
            "loss.beta=0",
            "model.num_layers=3",
            "task.options.sloppy_rate=0.3",
            "train.out_dir=runs/x",
            "rollout.top_k=5",
        ],
    )
    assert cfg.loss.beta == 0.0 and isinstance(cfg.loss.beta, float)  # the override wins, as float
    assert cfg.loss.opd == "jsd"  # from the preset
    assert cfg.optim.learning_rate == pytest.approx(3e-4)
    assert cfg.model.num_layers == 3
    assert cfg.model.hidden_size == RunConfig().model.hidden_size  # untouched siblings kept
    assert cfg.task.context == "hint"
    assert cfg.task.options["sloppy_rate"] == 0.3  # nested below a dict-valued field
    assert (
        cfg.data.batch_size == 8
        and cfg.data.max_prompt_tokens == RunConfig().data.max_prompt_tokens
    )
    assert cfg.train.out_dir == "runs/x" and cfg.rollout.top_k == 5
    preset = load_config(path)
    # A preset int for a float field becomes a float too.
    assert isinstance(preset.loss.beta, float) and preset.loss.beta == 1.0
    # A preset's task options replace the default options as a whole (another task's defaults must
    # not leak into it).
    assert preset.task.options == {"sloppy_rate": 0.5, "families": ["sum", "max"]}


def test_parse_overrides_nests_and_parses_scalars():
    assert parse_overrides(["a.b.c=1", "a.b.d=x", "a.e=0.5", "f=true", "g=", "h=[1, 2]"]) == {
        "a": {"b": {"c": 1, "d": "x"}, "e": 0.5},
        "f": True,
        "g": "",
        "h": [1, 2],
    }


def test_optional_field_takes_none_or_value():
    assert load_config(None, ["rollout.top_p=0.9"]).rollout.top_p == 0.9
    assert load_config(None, ["rollout.top_p=null"]).rollout.top_p is None
    with pytest.raises(TypeError, match=r"rollout\.top_p"):
        load_config(None, ["rollout.top_p=abc"])


@pytest.mark.parametrize(
    "override, key, valid",
    [
        ("betta=1", "betta", "loss"),
        ("loss.betta=1", "loss.betta", "beta_schedule"),
        ("model.hidden=3", "model.hidden", "hidden_size"),
    ],
)
def test_unknown_key_names_the_valid_ones(override, key, valid):
    with pytest.raises(KeyError) as e:
        load_config(None, [override])
    message = str(e.value)
    assert repr(key) in message and valid in message, message


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = _write(tmp_path, "loss:\n  betta: 1\n")
    with pytest.raises(KeyError, match=r"loss\.betta.*beta.*preset\.yaml"):
        load_config(path)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.steps=abc", "train.steps"),
        ("train.steps=1.5", "train.steps"),
        ("loss.opd=3", "loss.opd"),
        ("data.shuffle=maybe", "data.shuffle"),
        ("loss=0.5", "loss"),  # a whole section given a scalar
        ("task.options=3", "task.options"),
    ],
)
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(TypeError) as e:
        load_config(None, [override])
    assert repr(key) in str(e.value), str(e.value)


@pytest.mark.parametrize("overrides", [["foo"], ["loss.beta"], ["loss.beta=1", "loss.beta.x=2"]])
def test_malformed_override(overrides):
    with pytest.raises(ValueError, match="override"):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("loss.beta=-1", r"loss\.beta must be >= 0"),
        (
            "loss.opd=bogus",
            r"loss\.opd must be one of \['reverse_kl', 'reverse_kl_topk', 'forward_kl', "
            r"'jsd', 'sampled_token'\], got 'bogus'",
        ),
        (
            "loss.consistency=kl",
            r"loss\.consistency must be one of \['nca', 'dual_opd', 'sym_kl'\]",
        ),
        ("loss.beta_schedule=linear", r"loss\.beta_ramp_steps >= 1"),
        ("loss.jsd_beta=1.5", r"loss\.jsd_beta"),
        ("loss.top_k=0", r"loss\.top_k"),
        ("optim.min_lr_ratio=2", r"optim\.min_lr_ratio"),
        ("train.micro_batches=0", r"train\.micro_batches"),
        ("rollout.max_new_tokens=0", r"rollout\.max_new_tokens"),
        ("data.batch_size=0", r"data\.batch_size"),
        ("model.num_heads=3", r"model\.num_heads \(3\) must be a multiple of model\.num_kv_heads"),
        (
            "model.num_heads=3 model.num_kv_heads=1",
            r"model\.hidden_size \(\d+\) .* model\.num_heads",
        ),
    ],
)
def test_range_errors_name_the_key(override, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_config(None, override.split())


def test_linear_schedule_with_ramp_is_fine():
    cfg = load_config(None, ["loss.beta_schedule=linear", "loss.beta_ramp_steps=10"])
    assert cfg.loss == LossConfig(beta_schedule="linear", beta_ramp_steps=10)


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["loss.beta_schedule=adaptive"], r"loss\.beta_start_kl > 0"),
        (
            ["loss.beta_schedule=adaptive", "loss.beta_start_kl=0.1", "loss.beta_kl_ema=1"],
            r"loss\.beta_kl_ema must be in \[0, 1\)",
        ),
        (
            ["loss.beta_schedule=adaptive", "loss.beta_start_kl=0.1", "loss.beta_start_step=5"],
            r"loss\.beta_start_step would be ignored",
        ),
        (["loss.beta_start_kl=0.1"], r"loss\.beta_start_kl would be ignored"),
        (["loss.beta_schedule=delayed", "loss.beta_kl_ema=0.5"], r"loss\.beta_kl_ema would be"),
        (
            ["retention.gamma=0.1", "retention.gamma_schedule=adaptive"],
            r"retention\.gamma_schedule must be one of \['constant', 'delayed', 'linear'\]",
        ),
    ],
)
def test_adaptive_start_rule_settings(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_config(None, overrides)
    cfg = load_config(None, ["loss.beta_schedule=adaptive", "loss.beta_start_kl=0.05"])
    assert cfg.loss.beta_start_kl == 0.05 and cfg.loss.beta_kl_ema == 0.9


def test_missing_and_bad_files(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml"):
        load_config(missing)
    with pytest.raises(ValueError, match=r"bad\.yaml is not valid YAML"):
        load_config(_write(tmp_path, "loss: [1, 2\n", "bad.yaml"))
    with pytest.raises(ValueError, match=r"list\.yaml must hold a mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n", "list.yaml"))
    assert load_config(_write(tmp_path, "", "empty.yaml")) == RunConfig()


def test_from_dict_is_strict_at_every_level():
    assert from_dict(LossConfig, {"beta": 2}).beta == 2.0
    with pytest.raises(KeyError, match=r"'x'.*'beta'"):
        from_dict(LossConfig, {"x": 1})


def test_train_script_reports_config_errors(tmp_path):
    missing = str(tmp_path / "missing.yaml")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "train.py"), "--config", missing],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 2
    assert "config error" in proc.stderr and "missing.yaml" in proc.stderr


def test_single_task_option_override_merges_into_options_in_force(tmp_path):
    from ctxjax.config import TaskConfig

    cfg = load_config(None, ["task.options.sloppy_rate=0.3"])
    assert cfg.task.options == {**TaskConfig().options, "sloppy_rate": 0.3}
    preset = tmp_path / "p.yaml"
    preset.write_text("task: {name: synthetic, options: {families: [sum]}}\n")
    cfg = load_config(str(preset), ["task.options.max_len=4"])
    assert cfg.task.options == {"families": ["sum"], "max_len": 4}
    cfg = load_config(None, ["task.options={families: [max]}"])  # a whole mapping replaces
    assert cfg.task.options == {"families": ["max"]}


def test_numerics_section_is_apart_from_the_architecture():
    cfg = load_config(
        None, ["student=/some/folder", "numerics.compute_dtype=bfloat16", "numerics.remat=true"]
    )
    assert cfg.numerics == Numerics(compute_dtype="bfloat16", remat=True)
    assert cfg.model == RunConfig().model
    with pytest.raises(KeyError, match=r"'model\.remat'.*valid keys under model"):
        load_config(None, ["model.remat=true"])
    with pytest.raises(ValueError, match=r"numerics\.param_dtype must be one of"):
        load_config(None, ["numerics.param_dtype=int8"])


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (
            ["student=/s", "model.num_layers=3", "model.rope_theta=5e5"],
            r"^model\.num_layers, model\.rope_theta would be ignored \(with student= the "
            r"architecture comes from the student's config\.json\)",
        ),
    ],
)
def test_ignored_settings_are_errors_naming_the_keys(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_config(None, overrides)


def test_ignored_base_settings_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="ctxjax"):
        load_config(None, ["base.sft_steps=3"])  # used: the base model is built
        assert not caplog.records
        load_config(None, ["student=/s", "base.sft_steps=3"])
    assert "base.sft_steps ignored: student= is set" in caplog.text


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(REPO, "configs"))))
def test_presets_load(name):
    if name.endswith(".yaml") and name != "base_models.yaml":  # base_models.yaml: another schema
        load_config(os.path.join(REPO, "configs", name))


def test_to_dict_is_plain_json():
    cfg = RunConfig(
        model=dataclasses.replace(RunConfig().model, rope_scaling=("llama3", 4, 1, 4, 8))
    )
    values = to_dict(cfg)
    assert values["model"]["rope_scaling"] == ["llama3", 4, 1, 4, 8]
    assert json.loads(to_json(cfg)) == values
    assert values["numerics"] == {
        "param_dtype": "float32",
        "compute_dtype": "float32",
        "remat": False,
        "scan_layers": False,
    }


def test_jsonl_task_drops_the_synthetic_defaults():
    cfg = load_config(None, ["task.name=jsonl"])
    assert cfg.task.options == {} and cfg.task.context == ""
    cfg = load_config(None, ["task.name=jsonl", "task.options.eval_fraction=0.25"])
    assert cfg.task.options == {"eval_fraction": 0.25}


def test_steps_within_the_warmup_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="ctxjax"):
        load_config(None, ["train.steps=20"])  # above the default warmup of 10
        assert not caplog.records
        load_config(None, ["train.steps=5"])
    assert "train.steps=5 is not above optim.warmup_steps=10" in caplog.text
