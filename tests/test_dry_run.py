"""``--dry-run`` (both recipes) and the path checks that run before any model loads."""

from __future__ import annotations

import pytest

import train_stage1
import train_stage2
from configs.errors import UserError, run_cli
from tests._recipe_helpers import REPO

pytestmark = pytest.mark.usefixtures("fresh_coordexp_logger")

STAGE1_REAL = REPO / "configs" / "stage1" / "qwen3vl_2b.yaml"
STAGE2_REAL = REPO / "configs" / "stage2_two_channel" / "qwen3vl_2b.yaml"


@pytest.fixture
def no_weights(monkeypatch):
    """Loading weights fails the test: a dry run and a path error must come before it."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", refuse)


def _real_paths(env) -> list[str]:
    return ["--set", f"model.name_or_path={env.tiny_dir}", "--set", f"data.train_jsonl={env.shapes_dir / 'train.jsonl'}",
            "--set", f"data.val_jsonl={env.shapes_dir / 'val.jsonl'}", "--set", "data.image_root=null",
            "--set", "run.tracker.backend=none"]


def test_dry_run_on_a_real_config_with_placeholders_names_every_path(tmp_path, monkeypatch, capsys, no_weights):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COORDEXP_DEBUG", raising=False)
    assert run_cli(train_stage1.main, ["--config", str(STAGE1_REAL), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: 4 path problem(s): model.name_or_path='/path/to/")
    for key in ("data.train_jsonl='/path/to/", "data.val_jsonl='/path/to/", "data.image_root='/path/to/",
                "replace the /path/to/ placeholders"):
        assert key in err
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.parametrize("recipe,config,channels", [(train_stage1, STAGE1_REAL, False), (train_stage2, STAGE2_REAL, True)])
def test_dry_run_ready_config_prints_the_plan_and_exits_0(recipe, config, channels, recipe_env, tmp_path, monkeypatch,
                                                          capsys, no_weights):
    monkeypatch.chdir(tmp_path)
    assert run_cli(recipe.main, ["--config", str(config), *_real_paths(recipe_env), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "coord tokens present" in out
    assert "packing        8 samples" in out and "rows (packing on" in out
    assert "optimizer steps per epoch" in out
    assert "objective      token_ce(w=1" in out and ("ch=AB" in out) == channels
    assert "checksum" in out and out.rstrip().splitlines()[-1].startswith("dry run OK in ")
    assert not (tmp_path / "runs").exists()


def test_dry_run_reads_every_record_and_checks_images(recipe_env, tmp_path, monkeypatch, capsys, no_weights):
    lines = (recipe_env.shapes_dir / "train.jsonl").read_text().splitlines()
    lines[5] = lines[5].replace(".png", "_gone.png")
    bad = tmp_path / "train.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    argv = ["--config", str(STAGE1_REAL), *_real_paths(recipe_env), "--set", f"data.train_jsonl={bad}",
            "--set", f"data.image_root={recipe_env.shapes_dir}", "--dry-run"]
    monkeypatch.chdir(tmp_path)
    assert run_cli(train_stage1.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}:6: ") and "_gone.png" in err


def test_a_normal_run_checks_paths_before_the_model_loads(recipe_env, tmp_path, monkeypatch, no_weights):
    monkeypatch.chdir(tmp_path)
    argv = ["--config", str(STAGE1_REAL), *_real_paths(recipe_env), "--set", f"data.val_jsonl={tmp_path / 'val.jsonl'}"]
    with pytest.raises(UserError, match=r"^data.val_jsonl='.*val.jsonl': no such file"):
        train_stage1.main(argv)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("dry", [True, False])
def test_a_missing_semantic_model_is_one_error_line_at_start_up(dry, recipe_env, tmp_path, monkeypatch, capsys,
                                                                no_weights):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COORDEXP_DEBUG", raising=False)
    argv = ["--config", str(STAGE1_REAL), *_real_paths(recipe_env),
            "--set", f"eval.semantic.model={tmp_path / 'no_encoder'}", *(["--dry-run"] if dry else [])]
    assert run_cli(train_stage1.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: eval.semantic.model='{tmp_path / 'no_encoder'}': cannot load")
    assert not (tmp_path / "runs").exists()
