"""Two nodes of one process each on localhost: the deepspeed launcher's --no_ssh form, one invocation per node.

Exercises what only node rank 1 does: a global rank that differs from the local rank, a process that must
not write logs, TensorBoard or the manifest, yet writes its own ZeRO shard, and its own streaming cache.
"""

import subprocess

import pytest
from launch_util import FAST, REPO, deepspeed_cmd, env, free_port, scalars

pytestmark = pytest.mark.slow


def test_two_nodes_on_localhost(ftlm_cache, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    run_dir = tmp_path / "run"
    port = str(free_port())
    overrides = FAST + [
        f"trainer.out_dir={run_dir}",
        "trainer.max_steps=4",
        "trainer.log_interval=2",
        "trainer.eval_interval=4",
        "trainer.save_interval=4",
    ]
    procs = []
    for node in (0, 1):
        cmd = deepspeed_cmd(
            1,
            overrides,
            "--hostfile",
            str(hostfile),
            "--no_ssh",
            "--num_nodes",
            "2",
            "--node_rank",
            str(node),
            "--master_addr",
            "127.0.0.1",
        )
        cmd[cmd.index("--master_port") + 1] = port  # both nodes meet at one rendezvous
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env(ftlm_cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    for node, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"node {node} exited {p.returncode}:\n{out[-5000:]}"

    log = (run_dir / "train.log").read_text()
    assert "world size 2 (2 nodes x 1 per node)" in log
    assert "[rank 1]" not in log  # only global rank 0 writes the run's log
    assert "INFO step 4/4" in outputs[0] and "INFO step 4/4" not in outputs[1]
    assert sorted(scalars(run_dir)["train/loss"]) == [2, 4]
    ckpt = run_dir / "checkpoints" / "step_00000004"
    assert (ckpt / "zero_pp_rank_1_mp_rank_00_model_states.pt").is_file()  # written by node 1
    assert (ckpt / "rank1_state.pt").is_file() and (ckpt / "manifest.json").is_file()
