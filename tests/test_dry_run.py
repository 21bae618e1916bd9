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


# ------------------------------------------- what the run needs from the machine and the launch


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    """No wandb credentials anywhere (environment, netrc, settings file), whatever this machine has."""
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))


def _dry(recipe_env, *sets):
    argv = ["--config", str(STAGE1_REAL), *_real_paths(recipe_env), "--set", "training.mixed_precision=no"]
    for s in sets:
        argv += ["--set", s]
    return run_cli(train_stage1.main, [*argv, "--dry-run"])


def test_dry_run_refuses_wandb_online_without_an_api_key(recipe_env, tmp_path, monkeypatch, capsys, no_weights,
                                                         no_wandb_login):
    monkeypatch.chdir(tmp_path)
    online = ("run.tracker.backend=wandb", "run.tracker.mode=online")
    assert _dry(recipe_env, *online) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run.tracker.mode=online") and err.count("\n") == 1
    for fix in ("WANDB_API_KEY", "--set run.tracker.mode=offline", "WANDB_MODE=offline", "--set run.tracker.backend=none"):
        assert fix in err
    # each way out passes: offline, the environment's WANDB_MODE, a key in the environment or in ~/.netrc
    assert _dry(recipe_env, "run.tracker.backend=wandb", "run.tracker.mode=offline") == 0
    with monkeypatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        assert _dry(recipe_env, *online) == 0
    with monkeypatch.context() as mp:
        mp.setenv("WANDB_API_KEY", "x" * 40)
        assert _dry(recipe_env, *online) == 0
    (tmp_path / "home").mkdir()
    netrc = tmp_path / "home" / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "y" * 40 + "\n")
    netrc.chmod(0o600)
    assert _dry(recipe_env, *online) == 0


@pytest.mark.parametrize("gpus,cores,local,fix", [(0, 2, 8, "no CUDA GPU and 2 CPU core(s)"), (4, 64, 8, "4 CUDA GPU(s)")])
def test_dry_run_refuses_more_processes_than_devices(recipe_env, tmp_path, monkeypatch, capsys, no_weights,
                                                     gpus, cores, local, fix):
    """Under `accelerate launch --config_file configs/accelerate/ddp.yaml` (8 processes): more processes than
    GPUs, or than CPU cores without CUDA (gloo), is one error with the --num_processes to pass."""
    import training.preflight as preflight

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(preflight, "_cuda_devices", lambda: gpus)
    monkeypatch.setattr(preflight, "_cpu_cores", lambda: cores)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(local))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    assert _dry(recipe_env) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the launch starts {local} processes on this machine") and fix in err
    assert f"--num_processes {gpus or cores}" in err
    monkeypatch.setenv("WORLD_SIZE", str(gpus or cores))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(gpus or cores))
    assert _dry(recipe_env, "training.packing=false") == 0  # 8 unpacked rows: a batch for each rank
    assert f"launch         {gpus or cores} processes" in capsys.readouterr().out


def test_dry_run_checks_the_rollout_backend_is_installed_and_has_its_device(recipe_env, tmp_path, monkeypatch, capsys,
                                                                           no_weights):
    import training.preflight as preflight

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(preflight, "_cuda_devices", lambda: 0)
    monkeypatch.setattr(preflight, "_installed", lambda package: package != "vllm")
    assert _dry(recipe_env, "rollout_matching.backend=vllm") == 2
    assert "vllm is not installed" in capsys.readouterr().err
    monkeypatch.setattr(preflight, "_installed", lambda package: True)
    assert _dry(recipe_env, "rollout_matching.backend=vllm") == 2
    err = capsys.readouterr().err
    assert "rollout_matching.backend=vllm needs a CUDA GPU" in err and "--set rollout_matching.backend=hf" in err
    monkeypatch.setattr(preflight, "_cuda_devices", lambda: 1)
    assert _dry(recipe_env, "rollout_matching.backend=vllm") == 0


def test_half_precision_autocast_without_cuda_is_a_warning_with_the_slowdown(recipe_env, tmp_path, monkeypatch, capsys,
                                                                            no_weights):
    """The shipped real configs train in bf16: on a CPU machine the dry run says how slow and how to avoid it."""
    import training.preflight as preflight

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(preflight, "_cuda_devices", lambda: 0)
    assert _dry(recipe_env, "training.mixed_precision=bf16") == 0
    out = capsys.readouterr().out
    warning = next(line for line in out.splitlines() if "WARNING" in line)
    for part in ("training.mixed_precision=bf16 without a CUDA GPU", "9.2-11.0 s per optimizer step vs 0.45-0.90 s",
                 "--set training.mixed_precision=no"):
        assert part in warning
    assert _dry(recipe_env) == 0 and "WARNING" not in capsys.readouterr().out  # mixed_precision: no
    monkeypatch.setattr(preflight, "_cuda_devices", lambda: 1)
    assert _dry(recipe_env, "training.mixed_precision=bf16") == 0 and "WARNING" not in capsys.readouterr().out


def test_a_normal_run_checks_the_machine_before_the_model_loads(recipe_env, tmp_path, monkeypatch, no_weights,
                                                                no_wandb_login):
    """The same checks start every run: a wandb run without a key fails before any weight, nothing written."""
    monkeypatch.chdir(tmp_path)
    argv = ["--config", str(STAGE1_REAL), *_real_paths(recipe_env), "--set", "run.tracker.backend=wandb",
            "--set", "run.tracker.mode=online"]
    with pytest.raises(UserError, match=r"^run.tracker.mode=online .*no wandb API key"):
        train_stage1.main(argv)
    assert not (tmp_path / "runs").exists()
