"""The launch scripts: syntax, their one-line errors, and the command each one hands to its launcher.

Launchers (deepspeed, srun, scontrol) are replaced by stubs that print what they were given, so nothing trains
and nothing touches the network; `.invalid` names never resolve (RFC 6761).
"""

import os
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
SCRIPTS = ["single_node.sh", "multi_node.sh", "local_cpu.sh", "slurm.sbatch", "_common.sh"]

ARGV_PRINTER = """#!/usr/bin/env bash
for a in "$@"; do printf 'ARG<%s>\\n' "$a"; done
printf 'ENV<%s>\\n' "RANK=${RANK:-} LOCAL_RANK=${LOCAL_RANK:-} WORLD_SIZE=${WORLD_SIZE:-} \\
MASTER_ADDR=${MASTER_ADDR:-} MASTER_PORT=${MASTER_PORT:-} DS_ACCELERATOR=${DS_ACCELERATOR:-}"
"""


def run(script, args=(), env=None, timeout=20):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env.update(env or {})
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args], capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=timeout
    )


def stub(tmp_path, name, body=ARGV_PRINTER):
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(body)
    path.chmod(0o755)
    return path


def printed_args(stdout):
    return [line[4:-1] for line in stdout.splitlines() if line.startswith("ARG<")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax(script):
    assert subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True).returncode == 0


def test_slurm_outside_allocation_is_one_line_error():
    out = run("slurm.sbatch", ["model=tiny"])
    assert out.returncode != 0
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1 and "SLURM_JOB_ID" in out.stderr and "sbatch launch/slurm.sbatch" in out.stderr


def test_multi_node_unreachable_host_is_one_line_error(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# comment\n\nno-such-host.invalid slots=1\n")
    start = time.monotonic()
    out = run(
        "multi_node.sh", ["model=tiny"], env={"HOSTFILE": str(hostfile), "DEEPSPEED": str(stub(tmp_path, "deepspeed"))}
    )
    assert time.monotonic() - start < 15
    assert out.returncode != 0 and out.stdout == ""  # the launcher was never reached
    assert out.stderr.count("\n") == 1
    assert "'no-such-host.invalid'" in out.stderr and "ssh-copy-id no-such-host.invalid" in out.stderr


def test_multi_node_missing_hostfile(tmp_path):
    out = run("multi_node.sh", env={"HOSTFILE": str(tmp_path / "nope")})
    assert out.returncode != 0 and out.stderr.count("\n") == 1 and "hostfile.example" in out.stderr


def test_single_node_passes_overrides_untouched_and_adds_run_dir(tmp_path):
    deepspeed = stub(tmp_path, "deepspeed")
    env = {"DEEPSPEED": str(deepspeed), "FTLM_RUNS": str(tmp_path / "runs"), "JOB_NAME": "job-7", "NUM_GPUS": "4"}
    overrides = ["model=gpt_125m", "trainer.sample_prompts=[a b, 'c']", "data.mix.ko=0.8"]
    out = run("single_node.sh", overrides, env=env)
    assert out.returncode == 0, out.stderr
    args = printed_args(out.stdout)
    assert args[:5] == ["--num_gpus", "4", "--master_port", "29500", "--module"]
    assert args[5:] == ["ftlm.train.main", *overrides, f"trainer.out_dir={tmp_path}/runs/job-7"]
    # A run directory the user names wins.
    out = run("single_node.sh", ["trainer.out_dir=/elsewhere"], env=env)
    assert printed_args(out.stdout)[-2:] == ["ftlm.train.main", "trainer.out_dir=/elsewhere"]


def test_multi_node_overrides_survive_the_remote_shell(tmp_path):
    """The pdsh path joins the arguments into one line each node's shell parses: what the script sends must come
    back byte for byte from that shell, as ftlm.train.main reads it."""
    import json
    import shlex
    import sys

    from ftlm.config import strip_launcher_args

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    stub(tmp_path, "ssh", "#!/usr/bin/env bash\nexit 0\n")  # every host answers
    stub(tmp_path, "pdsh", "#!/usr/bin/env bash\nexit 0\n")
    deepspeed = stub(tmp_path, "deepspeed")
    env = {"HOSTFILE": str(hostfile), "DEEPSPEED": str(deepspeed), "JOB_NAME": "j", "FTLM_RUNS": "/shared/runs"}
    env["PATH"] = f"{tmp_path / 'bin'}:{os.environ['PATH']}"
    overrides = [
        "trainer.out_dir=/shared/runs/${model.name}",
        "trainer.run_name=ko(1b3)",
        "trainer.sample_prompts=['it''s here', \"a $HOME `x`\"]",
        "data.sources.ko=[/data/a b/*.jsonl]",
        "++data.tokenizer.special_tokens=[<|im_end|>]",
        "모델=한국어 \\ tab\tend",
    ]
    out = run("multi_node.sh", overrides, env=env)
    assert out.returncode == 0, out.stderr
    args = printed_args(out.stdout)
    module = args.index("--module")
    assert args[module + 1] == "ftlm.train.main"
    sent = args[module + 2 :]
    # what DeepSpeed's PDSHRunner.parse_user_args does to each argument, then the remote shell
    quoted = ['"{}"'.format(a.replace('"', '\\"')) if " " in a else a for a in sent]
    argv_as_json = f"{shlex.quote(sys.executable)} -c 'import json, sys; print(json.dumps(sys.argv[1:]))'"
    echoed = subprocess.run(
        ["bash", "-c", f"{argv_as_json} {' '.join(quoted)}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert strip_launcher_args(["prog", *json.loads(echoed)]) == ["prog", *overrides]
    from ftlm.config import ConfigError

    for damaged in ("@@@", sent[0].split("=", 1)[1][:-4]):  # not base64; cut short
        with pytest.raises(ConfigError, match="ftlm-overrides-b64"):
            strip_launcher_args(["prog", f"--ftlm-overrides-b64={damaged}"])


def test_local_cpu_two_processes_on_cpu(tmp_path):
    env = {"DEEPSPEED": str(stub(tmp_path, "deepspeed")), "JOB_NAME": "laptop", "FTLM_RUNS": "/r"}
    out = run("local_cpu.sh", ["trainer.max_steps=5"], env=env)
    assert out.returncode == 0, out.stderr
    assert printed_args(out.stdout) == [
        "--num_gpus",
        "2",
        "--master_port",
        "29500",
        "--module",
        "ftlm.train.main",
        "trainer.max_steps=5",
        "trainer.out_dir=/r/laptop",
        "trainer.device=cpu",
    ]
    assert "DS_ACCELERATOR=cpu" in out.stdout


# A stand-in for the deepspeed launcher on one machine: the runner starts `launch`, which starts one process per
# rank. Like deepspeed's, the runner dies of SIGTERM without passing it on; a rank records the signal and exits.
FAKE_DEEPSPEED = """#!{python}
import os, signal, subprocess, sys, time
role = os.environ.get("FAKE_ROLE", "runner")
out = os.environ["FAKE_OUT"]
if role == "rank":
    signal.signal(signal.SIGTERM, lambda *a: (open(f"{{out}}/stopped-{{os.getpid()}}", "w").close(), sys.exit(0)))
    open(f"{{out}}/started-{{os.getpid()}}", "w").close()
    while True:
        time.sleep(0.1)
children = 2 if role == "launch" else 1
procs = [subprocess.Popen([sys.argv[0]], env=dict(os.environ, FAKE_ROLE="rank" if role == "launch" else "launch"))
         for _ in range(children)]
sys.exit(max(p.wait() for p in procs))
"""


@pytest.mark.parametrize("script", ["single_node.sh", "local_cpu.sh"])
def test_sigterm_reaches_the_ranks_through_the_launcher(tmp_path, script):
    """kill, timeout or a scheduler's SIGTERM to the script: every rank gets it (to save and exit) and the script
    ends with them, instead of leaving the ranks training behind a launcher that died."""
    import signal
    import sys

    out = tmp_path / "out"
    out.mkdir()
    deepspeed = stub(tmp_path, "deepspeed", FAKE_DEEPSPEED.format(python=sys.executable))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(DEEPSPEED=str(deepspeed), FAKE_OUT=str(out), JOB_NAME="j", FTLM_RUNS=str(tmp_path / "runs"))
    proc = subprocess.Popen(["bash", str(LAUNCH / script)], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while len(list(out.glob("started-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(list(out.glob("started-*"))) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        started = sorted(p.name.split("-")[1] for p in out.glob("started-*"))
        assert sorted(p.name.split("-")[1] for p in out.glob("stopped-*")) == started
        assert "SIGTERM to the 2 training process(es)" in proc.stderr.read()
    finally:  # a rank left behind (the failure this test is about) must not outlive it
        for left in out.glob("started-*"):
            if not (out / left.name.replace("started", "stopped")).exists():
                try:
                    os.kill(int(left.name.split("-")[1]), signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_slurm_inside_a_fake_allocation(tmp_path):
    stub(tmp_path, "scontrol", "#!/usr/bin/env bash\nprintf 'gpu-a17\\ngpu-a18\\n'\n")
    # srun stub: drop srun's options and run the task command as task 0 of 16.
    stub(
        tmp_path,
        "srun",
        '#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\nSLURM_PROCID=0 SLURM_LOCALID=0 exec "$@"\n',
    )
    python = stub(tmp_path, "python-stub")
    env = {
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        "PYTHON": str(python),
        "FTLM_RUNS": "/runs",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "ko-1b3",
        "SLURM_JOB_NODELIST": "gpu-a[17-18]",
        "SLURM_NTASKS": "16",
        "SLURM_JOB_NUM_NODES": "2",
    }
    out = run("slurm.sbatch", ["model=gpt_1_3b", "trainer.lr=3e-4"], env=env)
    assert out.returncode == 0, out.stderr
    assert printed_args(out.stdout) == [
        "-m",
        "ftlm.train.main",
        "model=gpt_1_3b",
        "trainer.lr=3e-4",
        "trainer.out_dir=/runs/ko-1b3",
        "trainer.resume=auto",
    ]
    assert "RANK=0 LOCAL_RANK=0 WORLD_SIZE=16 MASTER_ADDR=gpu-a17 MASTER_PORT=24242" in out.stdout
