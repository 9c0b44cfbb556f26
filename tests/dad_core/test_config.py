"""Config schema: defaults, YAML round trip, dotted overrides, validation naming the dotted key, hashing."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from dad_core.config import (
    AttackConfig,
    CacheConfig,
    ConfigError,
    DADConfig,
    LossConfig,
    TrainConfig,
    config_hash,
    config_to_dict,
    load_config,
    parse_overrides,
    save_config,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _section_of(key: str) -> str:
    """The section holding ``key`` (fields move between sections as the schema evolves)."""
    cfg = DADConfig()
    return next(f.name for f in dataclasses.fields(cfg) if hasattr(getattr(cfg, f.name), key))


CROP = f"{_section_of('crop_scale')}.crop_scale"  # a tuple[float, float] field


def test_defaults_build_and_equal_the_empty_load():
    cfg = DADConfig()
    assert load_config() == cfg
    assert load_config(text="") == cfg
    assert cfg.attack == AttackConfig()
    assert cfg.train == TrainConfig()


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DADConfig().train.lr = 1.0  # type: ignore[misc]


def test_yaml_round_trip_of_a_non_default_config(tmp_path):
    cfg = load_config(
        overrides=[
            "train.lr=0.123",
            "train.clip_grad=1.5",
            "attack.norm=linf",
            "attack.eps=0.03",
            f"{CROP}=[0.5, 0.9]",
            "eval.suites=[a, b]",
            "teacher.checkpoint=/x/teacher.safetensors",
            "vqgan.train.epochs=3",
        ]
    )
    path = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(path)
    assert again == cfg
    # YAML -> dataclass -> YAML gives the same document.
    assert yaml.safe_load(path.read_text()) == config_to_dict(again)
    save_config(again, tmp_path / "again.yaml")
    assert (tmp_path / "again.yaml").read_text() == path.read_text()


def test_saved_yaml_is_plain_and_namespaced(tmp_path):
    path = save_config(DADConfig(), tmp_path / "c.yaml")
    doc = yaml.safe_load(path.read_text())
    assert set(doc) == {f.name for f in dataclasses.fields(DADConfig)}
    section, key = CROP.split(".")
    assert doc[section][key] == list(getattr(getattr(DADConfig(), section), key))  # tuples become lists
    assert doc["vqgan"]["train"]["epochs"] == DADConfig().vqgan.train.epochs


def test_file_values_are_merged_with_defaults():
    cfg = load_config(text="train:\n  epochs: 3\nattack:\n  norm: linf\n")
    assert cfg.train.epochs == 3
    assert cfg.attack.norm == "linf"
    assert cfg.train.lr == TrainConfig().lr
    assert cfg.data == DADConfig().data


@pytest.mark.parametrize(
    ("override", "getter", "expected"),
    [
        ("train.lr=0.1", lambda c: c.train.lr, 0.1),
        ("train.lr=1", lambda c: c.train.lr, 1.0),  # an int is a valid float
        ("train.lr=1e-3", lambda c: c.train.lr, 1e-3),  # YAML 1.1 reads this as a string
        ("train.min_lr=-2.5E-6", lambda c: c.train.min_lr, -2.5e-6),
        ("vqgan.train.epochs=2", lambda c: c.vqgan.train.epochs, 2),
        (f"{CROP}=[0.5,1.0]", lambda c: getattr(c, CROP.split(".")[0]).crop_scale, (0.5, 1.0)),
        ("teacher.checkpoint=null", lambda c: c.teacher.checkpoint, None),
        ("teacher.checkpoint=", lambda c: c.teacher.checkpoint, None),
        ("teacher.checkpoint=s3://b/t.pt", lambda c: c.teacher.checkpoint, "s3://b/t.pt"),
        ("train.clip_grad=2", lambda c: c.train.clip_grad, 2.0),
        ("train.pretrained=true", lambda c: c.train.pretrained, True),
        ("eval.suites=[digits_c, renditions]", lambda c: c.eval.suites, ("digits_c", "renditions")),
    ],
)
def test_dotted_overrides(override, getter, expected):
    value = getter(load_config(overrides=[override]))
    assert value == expected
    assert type(value) is type(expected)


def test_overrides_apply_after_the_file_and_later_wins():
    cfg = load_config(text="train:\n  epochs: 3\n  lr: 0.5\n", overrides=["train.epochs=4", "train.epochs=5"])
    assert cfg.train.epochs == 5
    assert cfg.train.lr == 0.5


def test_parse_overrides_nests_and_rejects_malformed_items():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}
    for bad in ("train.lr", "=3"):
        with pytest.raises(ConfigError, match="not of the form"):
            parse_overrides([bad])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("nosuch.key=1", "nosuch"),
        ("train.nosuch=1", "train.nosuch"),
        ("vqgan.train.nosuch=1", "vqgan.train.nosuch"),
    ],
)
def test_unknown_keys_are_named(override, key):
    with pytest.raises(ConfigError, match=rf"unknown config key {key}\b"):
        load_config(overrides=[override])


def test_unknown_key_in_a_file_is_named():
    with pytest.raises(ConfigError, match=r"unknown config key attack\.epsilon"):
        load_config(text="attack:\n  epsilon: 0.1\n")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("attack.eps=0", "attack.eps"),
        ("attack.eps=-0.1", "attack.eps"),
        ("attack.norm=l3", "attack.norm"),
        ("attack.mode=fgsm", "attack.mode"),
        ("attack.steps=0", "attack.steps"),
        ("attack.random_start=1.5", "attack.random_start"),
        ("train.epochs=0", "train.epochs"),
        ("train.ema_decay=1.0", "train.ema_decay"),
        ("loss.variant=B", "loss.variant"),
        ("loss.temperature=0", "loss.temperature"),
        ("loss.kd_weight=-0.5", "loss.kd_weight"),
        ("loss.kd_clean_weight=-1", "loss.kd_clean_weight"),
        ("loss.kd_adv_weight=.inf", "loss.kd_adv_weight"),
        ("loss.kd_adv_weight=.nan", "loss.kd_adv_weight"),
        (f"{CROP}=[0.9,0.5]", CROP),
        ("vqgan.train.epochs=0", "vqgan.train.epochs"),
        ("vqgan.precision=fp16", "vqgan.precision"),
        ("data.image_size=4", "data.image_size"),
        ("eval.crop_pct=1.5", "eval.crop_pct"),
    ],
)
def test_out_of_range_values_name_the_dotted_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}(?![\w.])"):
        load_config(overrides=[override])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.epochs=abc", "train.epochs"),
        ("train.epochs=true", "train.epochs"),  # bool is not an int here
        ("train.epochs=2.5", "train.epochs"),
        ("train.lr=fast", "train.lr"),
        ("train.lr=false", "train.lr"),
        ("train.pretrained=1", "train.pretrained"),
        ("train.model=3", "train.model"),
        (f"{CROP}=0.5", CROP),
        (f"{CROP}=[0.5]", CROP),
        (f"{CROP}=[a, 1.0]", rf"{CROP}\[0\]"),
        ("train.clip_grad=big", "train.clip_grad"),
        ("train=3", "train"),
    ],
)
def test_wrong_types_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}(?![\w.])"):
        load_config(overrides=[override])


def test_kd_weights_default_to_kd_weight_and_can_be_set_per_term():
    assert LossConfig().kd_weights == (0.5, 0.5)
    assert LossConfig(kd_weight=0.3).kd_weights == (0.3, 0.3)  # params files with only kd_weight keep working
    assert LossConfig(kd_weight=0.3, kd_adv_weight=1.0).kd_weights == (0.3, 1.0)
    assert LossConfig(kd_clean_weight=0.0, kd_adv_weight=0.0).kd_weights == (0.0, 0.0)
    cfg = load_config(overrides=["loss.kd_clean_weight=0.25"])
    assert cfg.loss.kd_weights == (0.25, 0.5) and cfg.loss.uses_teacher


def test_plain_ce_is_variant_a_with_both_kd_weights_zero():
    assert not LossConfig(kd_weight=0.0).uses_teacher
    assert not LossConfig(kd_clean_weight=0.0, kd_adv_weight=0.0).uses_teacher
    assert LossConfig(kd_weight=0.0, kd_adv_weight=0.1).uses_teacher
    assert LossConfig(variant="C", kd_weight=0.0).uses_teacher  # variant C has fixed weights, KL included


def test_per_term_kd_weights_are_refused_for_variant_c():
    with pytest.raises(ConfigError, match=r"^loss\.kd_adv_weight: applies to variant A only"):
        load_config(overrides=["loss.variant=C", "loss.kd_adv_weight=1"])


def test_top_level_must_be_a_mapping():
    with pytest.raises(ConfigError):
        load_config(text="- a\n- b\n")


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nope.yaml")


def test_config_hash_is_stable_and_sensitive():
    base = config_hash(DADConfig())
    assert base == config_hash(DADConfig()) == config_hash(load_config())
    assert len(base) == 16
    assert int(base, 16) >= 0
    assert config_hash(load_config(overrides=["attack.eps=0.2"])) != base
    assert config_hash(load_config(overrides=["vqgan.train.epochs=2"])) != base
    # Hash of a section follows the section only.
    attack = config_hash(DADConfig().attack)
    assert config_hash(load_config(overrides=["train.lr=0.5"]).attack) == attack
    assert config_hash(AttackConfig(eps=0.2)) != attack
    assert config_hash(CacheConfig(topk=3)) != config_hash(CacheConfig())


def test_repo_params_yaml_equals_the_dataclass_defaults():
    path = REPO_ROOT / "params.yaml"
    if not path.is_file():
        pytest.skip("params.yaml is not written yet (the lead adds it at the repo root)")
    assert load_config(path) == DADConfig()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train: {lr: 0.1\n", r"config .*c\.yaml: not valid YAML at line 2"),
        ("train:\n  lr: 0.1\n  lr: 0.2\n", r"config .*c\.yaml: duplicate key 'lr' at line 3"),
        ("train: {}\ntrain: {}\n", r"duplicate key 'train'"),
    ],
)
def test_malformed_or_ambiguous_yaml_is_a_one_line_config_error(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(tmp_path / "c.yaml")
    assert "\n" not in str(info.value)


def test_a_malformed_override_value_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"override 'train.lr=\[1,2': not valid YAML") as info:
        load_config(None, ["train.lr=[1,2"])
    assert "\n" not in str(info.value)
