import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (ROOT / "configs" / "demo").glob("*.yaml"))


def musicattr(*args, check=True):
    return subprocess.run([sys.executable, "-m", "musicattr.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          check=check)


def test_help_lists_every_subcommand():
    out = musicattr("--help").stdout
    for sub in ["corpus", "autoencoder", "encode", "fit", "fisher", "generate", "unlearn", "attribute",
                "evaluate", "compare", "report"]:
        assert f"  {sub} " in out


def test_unknown_subcommand_fails_clearly():
    r = musicattr("fitt", check=False)
    assert r.returncode == 2 and "unknown subcommand 'fitt'" in r.stderr


def test_demo_and_paper_configs_mirror_each_other():
    paper = sorted(p.name for p in (ROOT / "configs" / "paper").glob("*.yaml"))
    assert CONFIGS == paper
    for name in CONFIGS:
        d = yaml.safe_load((ROOT / "configs/demo" / name).read_text())
        p = yaml.safe_load((ROOT / "configs/paper" / name).read_text())
        assert set(d) == set(p), name
        for section in ("model", "data"):
            if isinstance(d.get(section), dict):
                assert set(d[section]) == set(p[section]), (name, section)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("flavour", ["demo", "paper"])
def test_print_config(name, flavour, capsys, monkeypatch):
    from musicattr.cli import main

    monkeypatch.chdir(ROOT)
    stage = name.removesuffix(".yaml")
    with pytest.raises(SystemExit) as e:
        main([stage, "--config", f"configs/{flavour}/{name}", "--print_config"])
    assert e.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed
    model = printed.get("model", printed)
    original = yaml.safe_load((ROOT / "configs" / flavour / name).read_text())
    original_model = original.get("model", original)
    for key in ("checkpoint", "store", "folder", "out_dir", "lr", "num_draws"):
        if key in original_model:
            assert model.get(key, model.get("init_args", {}).get(key)) == original_model[key], key
