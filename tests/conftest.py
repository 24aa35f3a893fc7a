import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _interpret_triton_without_a_gpu():
    """On a machine without a GPU the Triton kernels run under Triton's CPU interpreter, for the whole test
    process. triton.jit picks interpreted or compiled when a kernel is defined, and triton.language picks it for
    its own library (tl.sum, tl.max, ...) when triton is first imported; any test module may be the first to
    import triton (streaming and transformers can), so set the variable here, before any of them. Subprocesses
    inherit it; launchers that must not interpret strip it (tests/train/launch_util.py)."""
    import torch

    if torch.cuda.is_available():
        return
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "triton was imported before tests/conftest.py could set TRITON_INTERPRET=1 (a pytest plugin?); "
            "run the tests as `TRITON_INTERPRET=1 pytest ...` on a machine without a GPU"
        )
    os.environ.setdefault("TRITON_INTERPRET", "1")


_interpret_triton_without_a_gpu()


_PROCESS_GROUP_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def no_process_group_env_leaks():
    """A test that leaves RANK, LOCAL_RANK, ... in pytest's environment makes the tests after it on the same worker
    look like a distributed job to accelerate and lm-eval (which then wait for a rendezvous that never comes): such
    a test fails here, by name, and the variables are put back."""
    before = {k: os.environ.get(k) for k in _PROCESS_GROUP_ENV}
    yield
    after = {k: os.environ.get(k) for k in _PROCESS_GROUP_ENV}
    changed = {k: v for k, v in after.items() if v != before[k]}
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    assert not changed, f"the test left process-group variables in the environment: {changed}"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The test models are tiny: one thread is fastest for them, and spares the cores that the
    subprocesses of the training tests share."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory) -> Path:
    """A run directory as ftlm-train leaves it (config.yaml, tokenizer.json, checkpoints/step_00000002 with
    ZeRO-3 shards, latest) for a 2-layer layernorm+gelu model with grouped-query attention and vocab 512,
    trained 2 steps on random tokens; plus reference_weights.safetensors, the weights gathered by DeepSpeed.
    Built once per session in a subprocess, so torch.distributed stays out of pytest's process."""
    run_dir = tmp_path_factory.mktemp("tiny_run") / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT"):  # a group of its own
        env.pop(key, None)
    env["OMP_NUM_THREADS"] = "1"  # a tiny model; the cores are shared with the tests running beside it
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "eval" / "tiny_run.py"), str(run_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, f"building the tiny run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert json.loads(proc.stdout.strip().splitlines()[-1])["run_dir"] == str(run_dir)
    return run_dir
