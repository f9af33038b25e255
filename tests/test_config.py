"""RunConfig and YAML loading: precedence, exact fractions, and one-line errors for bad input."""

from __future__ import annotations

from fractions import Fraction

import pytest

from advprune.config import DEFAULT_EPS, FALLBACK_EPS, RunConfig, load_config, read_yaml
from advprune.errors import AdvpruneError, ConfigError


def write(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(*args, **kwargs) -> str:
    """The message of the ConfigError that ``load_config(*args, **kwargs)`` raises."""
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert isinstance(info.value, AdvpruneError)
    return msg


# ----------------------------------------------------------------------------- defaults, eps


def test_defaults():
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.dataset == "digits" and cfg.model == "digits_cnn" and cfg.method == "lwm"
    assert cfg.eps is None  # not set: the dataset default is used, and reported as such
    assert cfg.eps_text() == DEFAULT_EPS["digits"]
    assert cfg.eps_value() == float(Fraction(DEFAULT_EPS["digits"]))


def test_default_eps_follows_dataset():
    assert load_config(overrides={"dataset": "cifar10"}).eps_text() == DEFAULT_EPS["cifar10"]
    assert load_config(overrides={"dataset": "imagefolder"}).eps_text() == FALLBACK_EPS


@pytest.mark.parametrize("text", ["8/255", " 8/255 ", "8 / 255"])
def test_eps_fraction_is_exact(text):
    cfg = load_config(overrides={"eps": text})
    assert cfg.eps_value() == 8 / 255
    assert cfg.eps_text() == text.strip()  # kept as written, for the record


def test_yaml_eps_fraction_is_exact(tmp_path):
    cfg = load_config(write(tmp_path, "eps: 8/255\nstep_size: 2/255\n"))
    assert cfg.eps == "8/255"
    assert cfg.eps_value() == 8 / 255
    assert cfg.step_size_value() == 2 / 255


def test_yaml_eps_decimal(tmp_path):
    cfg = load_config(write(tmp_path, "eps: 0.03\n"))
    assert cfg.eps_text() == "0.03" and cfg.eps_value() == 0.03


@pytest.mark.parametrize("eps", ["8", 8, "16", "1.5"])
def test_linf_eps_above_one_is_an_error(eps):
    msg = config_error(overrides={"eps": eps})
    assert "outside [0, 1]" in msg
    if str(eps) in ("8", "16"):
        assert f"did you mean {eps}/255?" in msg
    assert not msg.startswith("config:")


def test_yaml_eps_above_one_names_the_file(tmp_path):
    path = write(tmp_path, "eps: 8\n")
    msg = config_error(path)
    assert str(path) in msg and "8/255" in msg


def test_eps_above_one_is_fine_for_l2():
    cfg = load_config(overrides={"eps": "1.5", "norm": "l2"})
    assert cfg.eps_value() == 1.5


@pytest.mark.parametrize("eps", ["-1/255", "abc", "1/0", "nan", True])
def test_bad_eps(eps):
    config_error(overrides={"eps": eps})


def test_step_size_checked_like_eps():
    msg = config_error(overrides={"step_size": "2"})
    assert "step_size" in msg and "2/255" in msg
    assert "step_size" in config_error(overrides={"step_size": "0"})
    cfg = load_config(overrides={"eps": "8/255", "attack_steps": 10})
    assert cfg.step_size_value() == pytest.approx(2.5 * (8 / 255) / 10)


def test_norm_canonical():
    assert load_config(overrides={"norm": "Linf"}).norm == "linf"
    assert load_config(overrides={"norm": "L2"}).norm == "l2"
    assert "valid norms: linf, l2" in config_error(overrides={"norm": "l3"})


# ----------------------------------------------------------------------------- sparsity


@pytest.mark.parametrize(("value", "expected"), [("0.9", 0.9), ("99/100", 0.99), (0, 0.0)])
def test_sparsity_accepted(value, expected):
    assert load_config(overrides={"sparsity": value}).sparsity == expected


@pytest.mark.parametrize("value", ["99", 99, "1.0", 1.0, "-0.1", "x"])
def test_sparsity_outside_unit_interval(value):
    msg = config_error(overrides={"sparsity": value})
    assert "sparsity" in msg
    if value not in ("x",):
        assert "[0, 1)" in msg and "removed fraction" in msg


# ----------------------------------------------------------------------------- other ranges


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("epochs", -1),
        ("seed", -1),
        ("batch_size", 0),
        ("attack_steps", 0),
        ("eval_steps", 0),
        ("n", 0),
        ("val_fraction", 1.0),
        ("val_fraction", -0.1),
        ("epochs", 2.5),
        ("batch_size", "many"),
    ],
)
def test_out_of_range_values(key, value):
    msg = config_error(overrides={key: value})
    assert msg.startswith(f"{key}:"), msg


def test_several_errors_on_one_line():
    msg = config_error(overrides={"epochs": -1, "batch_size": 0})
    assert "epochs" in msg and "batch_size" in msg


def test_assignment_is_validated():
    cfg = RunConfig()
    with pytest.raises(Exception, match="sparsity"):
        cfg.sparsity = 1.5


# ----------------------------------------------------------------------------- precedence


def test_precedence_defaults_yaml_overrides(tmp_path):
    path = write(tmp_path, "epochs: 3\neps: 4/255\nlr: 0.05\nprogress: false\n")
    base = {"epochs": 7, "lr": 0.2, "batch_size": 32}
    cfg = load_config(path, {"epochs": 1, "progress": None}, base=base)
    assert cfg.epochs == 1  # flag beats YAML
    assert cfg.eps == "4/255" and cfg.eps_value() == 4 / 255  # YAML kept, no flag
    assert cfg.lr == 0.05  # YAML beats the command's base
    assert cfg.batch_size == 32  # base beats the class default
    assert cfg.progress == "off"  # None override = not given
    assert cfg.momentum == RunConfig().momentum  # default


def test_yaml_values_recorded_as_written(tmp_path):
    cfg = load_config(write(tmp_path, "eps: 1/8\nsparsity: 0.99\ncheckpoint: a/b.safetensors\n"))
    assert cfg.eps == "1/8" and cfg.sparsity == 0.99 and cfg.checkpoint == "a/b.safetensors"


def test_set_fields_are_tracked(tmp_path):
    cfg = load_config(write(tmp_path, "model: digits_cnn\n"), {"epochs": 2})
    assert {"model", "epochs"} <= cfg.model_fields_set
    assert "eps" not in cfg.model_fields_set


# ----------------------------------------------------------------------------- YAML errors


def test_unknown_yaml_key_names_key_and_valid_keys(tmp_path):
    path = write(tmp_path, "epoch: 3\n")
    msg = config_error(path)
    assert str(path) in msg
    assert "epoch: unknown key" in msg
    assert "did you mean 'epochs'?" in msg
    assert "valid keys:" in msg and "attack_steps" in msg and "sparsity" in msg


def test_yaml_key_with_dashes_suggests_underscores(tmp_path):
    msg = config_error(write(tmp_path, "batch-size: 64\n"))
    assert "did you mean 'batch_size'?" in msg


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("- epochs\n- 3\n", "must hold a mapping of settings, not list"),
        ("42\n", "must hold a mapping of settings, not int"),
        ("just a sentence\n", "must hold a mapping of settings, not str"),
        ("eps: [1\n", "is not valid YAML"),
        ("1: 2\n", "is not a setting name"),
    ],
)
def test_yaml_that_is_not_a_mapping(tmp_path, text, words):
    path = write(tmp_path, text)
    msg = config_error(path)
    assert words in msg and str(path) in msg


def test_empty_yaml_means_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == RunConfig()
    assert read_yaml(write(tmp_path, "# only a comment\n", "c.yaml")) == {}


def test_missing_config_file(tmp_path):
    msg = config_error(tmp_path / "nope.yaml")
    assert "nope.yaml does not exist" in msg


def test_config_path_is_a_folder(tmp_path):
    assert "is not a file" in config_error(tmp_path)


def test_binary_config_file(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    config_error(path)
