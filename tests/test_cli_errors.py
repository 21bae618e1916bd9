"""Every CLI reports a user error as ONE line ``error: ...`` on stderr and exits 2 (traceback with --debug)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from configs.errors import ConfigError, UserError, run_cli
from tests._recipe_helpers import REPO

pytestmark = pytest.mark.usefixtures("fresh_coordexp_logger")


def _boom_user(argv):
    raise ConfigError("training.lr", "expected a number > 0, got -1; set it to e.g. 2e-5\nother problems: x: y")


def _boom_bug(argv):
    raise KeyError("internal")


def test_user_error_is_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("COORDEXP_DEBUG", raising=False)
    assert run_cli(_boom_user, []) == 2
    err = capsys.readouterr().err
    assert err == "error: training.lr: expected a number > 0, got -1; set it to e.g. 2e-5; other problems: x: y\n"


def test_debug_flag_and_env_show_the_traceback(monkeypatch):
    monkeypatch.delenv("COORDEXP_DEBUG", raising=False)
    with pytest.raises(ConfigError):
        run_cli(_boom_user, ["--debug"])
    monkeypatch.setenv("COORDEXP_DEBUG", "1")
    with pytest.raises(ConfigError):
        run_cli(_boom_user, [])
    monkeypatch.setenv("COORDEXP_DEBUG", "0")
    assert run_cli(_boom_user, []) == 2


def test_bugs_keep_their_traceback():
    with pytest.raises(KeyError):
        run_cli(_boom_bug, [])


def test_os_errors_read_as_path_and_reason(capsys, tmp_path):
    def missing(argv):
        open(tmp_path / "nope.json", encoding="utf-8")

    assert run_cli(missing, []) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope.json'}: No such file or directory\n"


def test_return_value_is_the_exit_status():
    assert run_cli(lambda argv: 3, []) == 3
    assert run_cli(lambda argv: {"loss": 1.0}, []) == 0
    assert run_cli(lambda argv: None, []) == 0


# (module, argv, text the one line must contain); every path below is missing on purpose.
CASES = [
    ("train_stage1", ["--config", "{tmp}/nope.yaml"], "nope.yaml does not exist"),
    ("train_stage2", ["--config", "{tmp}/nope.yaml"], "nope.yaml does not exist"),
    ("train_stage1", ["--config", "configs/demo/stage1_shapes.yaml", "--set", "training.lr=-1"], "training.lr"),
    ("eval.evaluate", ["--predictions", "{tmp}/preds.jsonl"], "preds.jsonl"),
    ("eval.visualize", ["--predictions", "{tmp}/preds.jsonl", "--out-dir", "{tmp}/viz"], "preds.jsonl"),
    # the checkpoint first: its saved settings say how to read the JSONL
    ("eval.infer", ["--checkpoint", "{tmp}/ckpt", "--jsonl", "{tmp}/val.jsonl", "--out", "{tmp}/p.jsonl"], "--checkpoint="),
    ("scripts.add_coord_tokens", ["{tmp}/ckpt", "--out", "{tmp}/out"], "no such directory"),
    ("scripts.coco_to_jsonl", ["--coco", "{tmp}/instances.json", "--out", "{tmp}/x.jsonl"], "instances.json"),
    ("scripts.plot_metrics", ["{tmp}/run"], "no metrics.jsonl"),
]


@pytest.mark.parametrize("module,argv,needle", CASES, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(CASES)])
def test_every_cli_reports_user_errors_in_one_line(module, argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("COORDEXP_DEBUG", raising=False)
    monkeypatch.chdir(REPO)
    main = importlib.import_module(module).main
    assert run_cli(main, [a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert needle in err


def test_add_coord_tokens_bad_path_subprocess(tmp_path):
    """The real entry point: no hub traceback, one line, exit 2; ``--debug`` brings the traceback back."""
    cmd = [sys.executable, "scripts/add_coord_tokens.py", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("COORDEXP_DEBUG", None)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: checkpoint="), proc.stderr
    proc = subprocess.run([*cmd, "--debug"], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_user_error_types():
    from data.packing import PackingError
    from data.records import DataError

    for cls in (ConfigError, DataError, PackingError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError)


@pytest.mark.parametrize("module,stage,other", [("train_stage1", "train_stage1.py", "stage2_ab"),
                                                ("train_stage2", "train_stage2.py", "stage1.")])
def test_recipe_help_shows_its_own_stage(module, stage, other, capsys):
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(module).parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert stage in text and "--debug" in text and "--set" in text
    assert other not in text
