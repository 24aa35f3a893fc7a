"""Typed, composed configuration: unknown keys and wrong types fail at compose time naming the key; presets are
composed, not copied; Hydra never writes into the working directory (no literal `~` folder), also in a sweep."""

import subprocess
import sys

import pytest
from launch_util import FAST, REPO, env, python_cmd, python_prepare_cmd, run_status
from omegaconf import OmegaConf

from ftlm.config import ConfigError, compose


@pytest.mark.parametrize(
    "override,named,closest",
    [
        ("+trainer.max_step=3", "trainer.max_step", "trainer.max_steps"),  # what Hydra's own hint suggests for a typo
        ("trainer.max_step=3", "trainer.max_step", "trainer.max_steps"),
        ("+deepspeed.offload_param=true", "deepspeed.offload_param", "deepspeed.offload_params"),
        ("trainer.eval_intervall=5", "trainer.eval_intervall", "trainer.eval_interval"),
    ],
)
def test_unknown_keys_fail_at_compose_naming_the_closest_key(override, named, closest):
    with pytest.raises(ConfigError) as e:
        compose([override])
    assert f"unknown config key {named}; did you mean {closest}?" in str(e.value)


@pytest.mark.parametrize(
    "override,named",
    [
        ("trainer.lr=abc", "trainer.lr"),
        ("trainer.max_steps=1.5", "trainer.max_steps"),
        ("deepspeed.stage=x", "deepspeed.stage"),
    ],
)
def test_wrong_types_fail_at_compose_naming_the_key(override, named):
    with pytest.raises(ConfigError) as e:
        compose([override])
    assert str(e.value).startswith(f"{named}: Value ") and "could not be converted" in str(e.value)


def test_values_are_typed_and_free_dicts_stay_open():
    cfg = compose(["trainer.lr=1e-3", "trainer.max_steps=7", "+deepspeed.extra.wall_clock_breakdown=true"])
    assert isinstance(cfg.trainer.lr, float) and cfg.trainer.lr == 1e-3 and cfg.trainer.max_steps == 7
    assert cfg.deepspeed.extra == {"wall_clock_breakdown": True}  # deepspeed.extra takes any DeepSpeed key


def test_deepspeed_groups_are_composed_from_zero3():
    zero3 = OmegaConf.to_container(compose([]).deepspeed)
    zero2 = OmegaConf.to_container(compose(["deepspeed=zero2"]).deepspeed)
    offload = OmegaConf.to_container(compose(["deepspeed=zero3_offload"]).deepspeed)
    assert {k for k in zero3 if zero3[k] != zero2[k]} == {"stage"} and zero2["stage"] == 2
    assert {k for k in zero3 if zero3[k] != offload[k]} == {"offload_optimizer", "offload_params"}
    # ... and their files say only that: one place for each value.
    for name, keys in (
        ("zero2", {"defaults", "stage"}),
        ("zero3_offload", {"defaults", "offload_optimizer", "offload_params"}),
    ):
        assert set(OmegaConf.load(REPO / "conf" / "deepspeed" / f"{name}.yaml")) == keys


def test_every_trainer_key_has_a_comment():
    lines = (REPO / "conf" / "trainer" / "default.yaml").read_text().splitlines()
    keys = [line for line in lines if line and not line.startswith((" ", "#", "-")) and ":" in line]
    assert len(keys) > 30
    for line in keys:
        assert "#" in line or line.startswith("defaults:"), f"no comment on: {line}"


def _cli(args, cwd, home, cache):
    e = env(cache)
    e.pop("FTLM_RUNS", None)
    e["HOME"] = str(home)
    return subprocess.run(args, cwd=cwd, env=e, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_apps_create_nothing_in_the_working_directory(ftlm_cache, tmp_path):
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    # A key that does not exist: one line naming it, exit status 2, before Hydra runs (nothing anywhere).
    proc = _cli([sys.executable, "-m", "ftlm.train.main", "+trainer.max_step=3"], cwd, home, ftlm_cache)
    assert proc.returncode == 2, proc.stderr
    assert "error: unknown config key trainer.max_step; did you mean trainer.max_steps?" in proc.stderr
    assert "Traceback" not in proc.stderr
    # A config the trainer refuses after Hydra started the job: Hydra's folder is the runs root under $HOME (not
    # ./~), and the refused run leaves no run directory behind.
    proc = _cli([sys.executable, "-m", "ftlm.train.main", "trainer.max_steps=0"], cwd, home, ftlm_cache)
    assert proc.returncode != 0 and "trainer.max_steps must be a positive integer" in proc.stdout + proc.stderr
    assert list((home / ".cache" / "ftlm" / "runs").iterdir()) == []
    # ftlm-prepare with a data config that fails its checks.
    proc = _cli([sys.executable, "-m", "ftlm.data.prepare", "data.mix.ko=2"], cwd, home, ftlm_cache)
    assert proc.returncode == 2 and "ftlm-prepare: error: data.mix shares must sum to 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(cwd.iterdir()) == []


@pytest.mark.slow
def test_a_sweep_keeps_each_job_in_its_own_run_directory(ftlm_cache, tmp_path):
    cwd, runs = tmp_path / "cwd", tmp_path / "runs"
    cwd.mkdir()
    e = {**env(ftlm_cache), "FTLM_RUNS": str(runs)}
    overrides = FAST + ["trainer.eval_interval=0", "trainer.log_interval=1", "trainer.save_interval=100"]
    proc = subprocess.run(
        [sys.executable, "-m", "ftlm.train.main", "-m", *overrides, "trainer.run_name=sw", "trainer.max_steps=1,2"],
        cwd=cwd,
        env=e,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert list(cwd.iterdir()) == []  # no multirun/ folder here
    (sweep,) = (runs / "sweeps").iterdir()
    assert sweep.name.startswith("sw-")  # named by trainer.run_name; its jobs in folders of their own
    for job, steps in ((0, 1), (1, 2)):
        log = (sweep / str(job) / "train.log").read_text()
        assert f"step {steps}/{steps}" in log and f"step_{steps:08d}" in log
        assert "#1 :" not in log and "Launching" not in log  # Hydra's lines for the next job stay out of it


@pytest.mark.parametrize(
    "overrides,line",
    [
        # the trainer's own checks, before any process group exists
        (["trainer.lr=-1"], "ftlm-train: error: trainer.lr must be positive, got -1.0"),
        # the model's (GPTConfig)
        (["model.n_head=3"], "ftlm-train: error: model.d_model: 64 is not divisible by n_head=3"),
        # found by the data path once training has started (distributed set up, run directory locked)
        (["data=custom"], "ftlm-train: error: data.sources.ko: no file matches /path/to/korean/*.jsonl"),
    ],
)
def test_a_refused_run_says_why_in_one_line_and_exits_2(ftlm_cache, tmp_path, overrides, line):
    cmd = python_cmd(FAST + overrides + [f"trainer.out_dir={tmp_path / 'run'}"])
    proc = run_status(cmd, ftlm_cache)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert line in proc.stderr.splitlines()
    assert "Traceback" not in proc.stdout + proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    if overrides == ["trainer.lr=-1"]:  # Hydra's switch still shows where it was raised
        proc = run_status(cmd, ftlm_cache, extra_env={"HYDRA_FULL_ERROR": "1"})
        assert proc.returncode != 0 and "Traceback" in proc.stderr and "check_trainer_config" in proc.stderr


def test_prepare_names_a_source_without_files_in_one_line(ftlm_cache, tmp_path):
    proc = run_status(python_prepare_cmd("data=custom", f"data.out_dir={tmp_path / 'data'}"), ftlm_cache)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "ftlm-prepare: error: data.sources.ko: no file matches /path/to/korean/*.jsonl" in proc.stderr.splitlines()
    assert "Traceback" not in proc.stderr
