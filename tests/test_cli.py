import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (ROOT / "configs" / "demo").glob("*.yaml") if p.name != "run.yaml")


def musicattr(*args, check=True):
    return subprocess.run([sys.executable, "-m", "musicattr.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          check=check)


def test_help_lists_every_subcommand():
    out = musicattr("--help").stdout
    for sub in ["corpus", "autoencoder", "encode", "fit", "fisher", "generate", "unlearn", "attribute", "index",
                "query", "evaluate", "compare", "counterfactual", "adherence", "report"]:
        assert f"  {sub} " in out


def test_unknown_subcommand_fails_clearly():
    r = musicattr("fitt", check=False)
    assert r.returncode == 2 and "unknown subcommand 'fitt'" in r.stderr


def test_demo_and_paper_configs_mirror_each_other():
    paper = sorted(p.name for p in (ROOT / "configs" / "paper").glob("*.yaml") if p.name != "run.yaml")
    assert CONFIGS == paper
    for name in CONFIGS:
        d = yaml.safe_load((ROOT / "configs/demo" / name).read_text())
        p = yaml.safe_load((ROOT / "configs/paper" / name).read_text())
        assert set(d) == set(p), name
        for section in ("model", "data"):
            if isinstance(d.get(section), dict):
                assert set(d[section]) == set(p[section]), (name, section)


def print_config(*args, monkeypatch, capsys) -> dict:
    from musicattr.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("MUSICATTR_RUN_ROOT", raising=False)
    with pytest.raises(SystemExit) as e:
        main([*args, "--print_config"])
    assert e.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("flavour", ["demo", "paper"])
def test_print_config(name, flavour, capsys, monkeypatch):
    stage = name.removesuffix(".yaml")
    printed = print_config(stage, "--config", f"configs/{flavour}/{name}", monkeypatch=monkeypatch, capsys=capsys)
    assert printed
    root = yaml.safe_load((ROOT / "configs" / flavour / "run.yaml").read_text())["run_root"]
    assert printed["run_root"] == root == f"runs/{flavour}"
    text = (ROOT / "configs" / flavour / name).read_text().replace("${run_root}", root)
    original = yaml.safe_load(text)
    for section in ("model", "data", None):
        want = original.get(section, {}) if section else original
        got = printed.get(section, {}) if section else printed
        for key in ("checkpoint", "store", "folder", "out_dir", "out", "unlearned", "fisher", "lr", "num_draws"):
            if key in want and not isinstance(want[key], dict):
                assert got[key] == want[key], (section, key)
    assert "${run_root}" not in yaml.safe_dump(printed)


def test_demo_configs_name_the_run_root_once():
    texts = {p.name: p.read_text() for p in (ROOT / "configs" / "demo").glob("*.yaml")}
    assert sum(t.count("runs/demo") for t in texts.values()) == 1 and "runs/demo" in texts["run.yaml"]


def test_run_root_option_and_environment_move_every_path(capsys, monkeypatch):
    printed = print_config("fit", "--config", "configs/demo/fit.yaml", "--run_root", "runs/mine",
                           monkeypatch=monkeypatch, capsys=capsys)
    assert printed["data"]["store"] == "runs/mine/store" and printed["trainer"]["default_root_dir"] == "runs/mine/fit"
    dirs = [c["init_args"].get("dirpath") for c in printed["trainer"]["callbacks"]]
    assert "runs/mine/fit" in dirs
    assert all("runs/demo" not in str(v) for v in printed["model"]["model_config"].values())
    from musicattr.cli import main

    monkeypatch.setenv("MUSICATTR_RUN_ROOT", "runs/env")
    with pytest.raises(SystemExit):
        main(["attribute", "--config", "configs/demo/attribute.yaml", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["data"]["store"] == "runs/env/store"


def test_placeholder_without_run_root_fails_clearly(tmp_path, monkeypatch, capsys):
    from musicattr.cli import main

    (tmp_path / "unlearn.yaml").write_text("checkpoint: ${run_root}/fit/last.ckpt\n")
    monkeypatch.delenv("MUSICATTR_RUN_ROOT", raising=False)
    with pytest.raises(SystemExit, match="no run root is set; fix: pass --run_root"):
        main(["unlearn", "--config", str(tmp_path / "unlearn.yaml"), "--print_config"])


@pytest.mark.parametrize("stage", ["evaluate", "compare"])
def test_function_stages_take_the_trainer_options(stage, capsys, monkeypatch):
    printed = print_config(stage, "--config", f"configs/demo/{stage}.yaml", "--trainer.devices", "2",
                           "--trainer.strategy", "ddp_spawn", "--trainer.precision", "bf16-mixed",
                           monkeypatch=monkeypatch, capsys=capsys)
    t = printed["trainer"]
    assert (str(t["devices"]), t["strategy"], t["precision"]) == ("2", "ddp_spawn", "bf16-mixed")
    assert t["logger"] is False and t["use_distributed_sampler"] is False  # the prediction defaults
    assert printed["task"]["class_path"] == "musicattr.models.sat_task.SATDiffusionTask"


def test_stage_table_names_importable_targets():
    import importlib

    from musicattr.cli import STAGES

    for name, stage in STAGES.items():
        for target in filter(None, (stage.target, stage.data)):
            module, attr = target.split(":")
            assert callable(getattr(importlib.import_module(module), attr)), (name, target)
        assert (stage.subcommand is None) or stage.subcommand in ("fit", "predict")
