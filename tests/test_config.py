import subprocess
import sys

import pytest

from lit_restore.cli import build_parser
from lit_restore.config import BIQAModelConfig, ConfigError, RestorerModelConfig, load_config, to_yaml


@pytest.fixture
def yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("stage: biqa\ndata:\n  batch_size: 4\nmodel:\n  arch: ViT-B-32\n")
    return p


def test_merge_yaml_and_overrides(yaml_file):
    cfg = load_config(yaml_file, ["data.crop=64", "trainer.max_steps=7", "data.train=s/{000..003}.tar"])
    assert isinstance(cfg.model, BIQAModelConfig)
    assert cfg.model.arch == "ViT-B-32"
    assert cfg.data.batch_size == 4 and cfg.data.crop == 64
    assert cfg.trainer["max_steps"] == 7
    assert [s.url for s in cfg.data.train] == ["s/{000..003}.tar"]


def test_stage_selects_model_schema(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("stage: restorer\n")
    assert isinstance(load_config(p).model, RestorerModelConfig)
    with pytest.raises(ConfigError, match="model.arch: 'ViT-B-32' is not allowed"):
        load_config(p, ["model.arch=ViT-B-32"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.batch_sizee=3", "data.batch_sizee: unknown key; allowed here: batch_size"),
        ("data.batch_size=abc", "data.batch_size:"),
        ("model.loss=hinge", "model.loss: 'hinge' is not allowed; choose one of fidelity, ce"),
        ("stage=gan", "stage: 'gan' is not allowed"),
        ("logger=tensorboard", "logger: 'tensorboard' is not allowed; choose one of wandb, csv, none"),
        ("data.batch_size=0", "data.batch_size: 0 must be > 0"),
        ("nonsense", "expected key=value"),
    ],
)
def test_errors_name_the_key(yaml_file, override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(yaml_file, [override])
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_weighted_sources(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("stage: restorer\ndata:\n  train:\n    - {url: 'a/{0..1}.tar', weight: 3}\n    - b/0.tar\n")
    cfg = load_config(p)
    assert [(s.url, s.weight) for s in cfg.data.train] == [("a/{0..1}.tar", 3.0), ("b/0.tar", 1.0)]


def test_print_config_roundtrip(yaml_file, tmp_path):
    text = to_yaml(load_config(yaml_file))
    again = tmp_path / "again.yaml"
    again.write_text(text)
    assert to_yaml(load_config(again)) == text


def test_cli_print_config_and_errors(yaml_file):
    exe = [sys.executable, "-m", "lit_restore.cli"]
    ok = subprocess.run(exe + ["fit", str(yaml_file), "--print-config", "seed=5"], capture_output=True, text=True)
    assert ok.returncode == 0 and "seed: 5" in ok.stdout
    bad = subprocess.run(exe + ["fit", str(yaml_file), "--print-config", "data.nope=1"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["lit-restore: config error: data.nope: unknown key; allowed here: "
                                               + bad.stderr.split("allowed here: ")[1].strip()]


@pytest.mark.parametrize("command", ["prep-shards", "prep-sample", "degrade", "fit", "export", "restore", "evaluate", "sbatch"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([command, "--help"])
    assert info.value.code == 0
    assert "usage: lit-restore " + command in capsys.readouterr().out
