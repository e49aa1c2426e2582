import os
import subprocess
import sys
from pathlib import Path

import pytest

from lit_restore.cli import build_parser
from lit_restore.config import BIQAModelConfig, ConfigError, RestorerModelConfig, load_config, to_yaml

REPO = Path(__file__).resolve().parent.parent


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
    p.write_text("stage: restorer\nmodel: {constyle_mode: joint}\n")
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
    p.write_text("stage: constyle\ndata:\n  train:\n    - {url: 'a/{0..1}.tar', weight: 3}\n    - b/0.tar\n")
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


@pytest.mark.parametrize(
    "override, expected",
    [
        ("trainer.bogus_key=1", "trainer.bogus_key: not an argument of lightning.Trainer"),
        ("trainer.max_step=3", "trainer.max_step: not an argument of lightning.Trainer; did you mean max_steps?"),
        ("trainer.max_steps=abc", "trainer.max_steps: 'abc' is not a valid value (lightning.Trainer expects one of: int)"),
        ("trainer.precision=17", "trainer.precision: 17 is not a valid value"),
        ("trainer.logger=true", "trainer.logger: set by lit_restore fit; use logger instead"),
        ("model=null", "model: None is not allowed"),
        ("wandb.name=${oc.env:LIT_RESTORE_TEST_SECRET_}", None),
        ("wandb.name=${oc.env:SECRET_TOKEN}", "wandb.name: ${oc.env:SECRET_TOKEN} is not allowed"),
        ("out_dir=runs/${oc.env:AWS_SECRET_ACCESS_KEY,x}", "out_dir: ${oc.env:AWS_SECRET_ACCESS_KEY} is not allowed"),
    ],
)
def test_trainer_model_and_env_errors(yaml_file, monkeypatch, override, expected):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    monkeypatch.setenv("LIT_RESTORE_TEST_SECRET_", "run-7")
    if expected is None:  # an allowed name resolves as usual
        assert load_config(yaml_file, [override]).wandb.name == "run-7"
        return
    with pytest.raises(ConfigError) as info:
        load_config(yaml_file, [override])
    assert expected in str(info.value) and "\n" not in str(info.value) and "hunter2" not in str(info.value)


def test_trainer_values_lightning_accepts(yaml_file):
    cfg = load_config(yaml_file, ["trainer.devices=0,1", "trainer.precision=bf16-mixed", "trainer.max_time=00:01:00:00",
                                  "trainer.gradient_clip_val=1", "trainer.enable_progress_bar=false"])
    assert cfg.trainer["devices"] == "0,1" and cfg.trainer["gradient_clip_val"] == 1


def test_yaml_errors_keep_line_and_column(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("stage: restorer\ndata:\n  batch_size: [1, 2\nmodel: {}\n")
    with pytest.raises(ConfigError, match=rf"^{p}:4:6: cannot parse YAML: .*expected ',' or ']'"):
        load_config(p)


def test_user_errors_are_one_line_exit_2_before_any_model(tmp_path, capsys):
    """Each was a traceback (the missing shards only after the model was built)."""
    from lit_restore.weights import WeightsError
    from lit_restore.cli import main

    out = tmp_path / "run"
    base = [str(REPO / "configs/tiny/restorer.yaml"), f"out_dir={out}"]
    for args, expected in [
        (["fit", *base, "trainer.bogus_key=1"], "lit-restore: config error: trainer.bogus_key: not an argument"),
        (["fit", *base, f"data.train={tmp_path}/train-{{000000..000009}}.tar"], "10 of 10 shard files not found"),
        (["fit", *base, f"data.train={tmp_path}/"], f"{tmp_path}/ is a folder; give its shard files, e.g. "
                                                    f"data.train='{tmp_path}/*.tar'"),
        (["fit", str(REPO / "configs/biqa.yaml"), f"out_dir={out}", "trainer.devices=999"],
         "needs 999 CUDA GPU(s) per node, this machine has"),
        (["export", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "x")], "missing.ckpt: checkpoint not found"),
    ]:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
        assert not out.exists()  # nothing was started
    with pytest.raises(WeightsError):
        main(["export", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "x"), "--debug"])


def test_closed_pipe_is_quiet():
    proc = subprocess.Popen([sys.executable, "-m", "lit_restore.cli", "degrade", "--list-tasks"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # `| head` that has read enough
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == b""


# Values every one of the three entry points must refuse, and the key each error names.
BAD_CONFIGS = [
    ("configs/tiny/biqa.yaml", "model.classes=[noise,blur]", "model.gt_as_no"),
    ("configs/tiny/ldm.yaml", "model.drop_text=0.95", "model.drop_text + drop_both + drop_image"),
    ("configs/tiny/ldm.yaml", "model.val_steps=0", "model.val_steps"),
    ("configs/tiny/scm.yaml", "model.t_power=0", "model.t_power"),
    ("configs/tiny/scm.yaml", "model.ldm.drop_image=2", "model.ldm.drop_image"),
    ("configs/tiny/restorer.yaml", "model.constyle_mode=frozen", "model.constyle_weights"),
    ("configs/tiny/restorer.yaml", "model.width=18", "model.width"),
    ("configs/foundations/autoencoder.yaml", "model.kl_weight=-1", "model.kl_weight"),
    ("configs/tiny/constyle.yaml", "model.momentum=1.5", "model.momentum"),
]


@pytest.mark.parametrize("config,override,key", BAD_CONFIGS)
def test_print_config_check_and_fit_refuse_the_same_configs(config, override, key, tmp_path, capsys):
    from lit_restore.cli import main

    root = Path(__file__).resolve().parents[1]
    for mode in (["--print-config"], ["--check"], []):
        code = main(["fit", str(root / config), f"out_dir={tmp_path / 'run'}", override, *mode])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and key in err, (mode, err)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_commands_make_openmp_waits_passive_unless_the_user_chose(monkeypatch, capsys):
    """Spinning OpenMP waits cost evaluate 40 % beside one busy process (docs/benchmarks.md)."""
    from lit_restore.cli import main

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert main(["degrade", "--list-ops"]) == 0
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert main(["degrade", "--list-ops"]) == 0
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_yaml_overrides_merge_in_order_and_key_values_come_last(tmp_path):
    """`fit RECIPE DATA.yaml key=value`: a protocol's data over a stage's recipe."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    layer = tmp_path / "data.yaml"
    layer.write_text("data:\n  train:\n    - {url: a/*.tar, weight: 2}\n    - {url: b/*.tar}\n  batch_size: 3\n")
    cfg = load_config(repo / "configs/tiny/restorer.yaml", [str(layer), "data.batch_size=5"])
    assert [(s.url, s.weight) for s in cfg.data.train] == [("a/*.tar", 2.0), ("b/*.tar", 1.0)]
    assert cfg.data.batch_size == 5 and cfg.stage == "restorer"
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(repo / "configs/tiny/restorer.yaml", [str(tmp_path / "missing.yaml")])
