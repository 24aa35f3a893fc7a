"""Benchmarks during training (issue 13): lm-evaluation-harness tasks on the live model with 2 ranks under ZeRO-3,
logged as bench/<task>/<metric>; a task that fails is logged and skipped and training goes on."""

import importlib.util
import json
import textwrap

import pytest
from launch_util import FAST, REPO, deepspeed_cmd, run, scalars

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'ftlm[eval]')")
pytestmark = pytest.mark.slow


def eval_fixture():
    """tests/eval/test_harness.py's fixture task: 20 Korean multiple-choice items over local JSON (ko_mc)."""
    spec = importlib.util.spec_from_file_location("harness_fixture", REPO / "tests" / "eval" / "test_harness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_tasks_during_training_with_two_ranks(ftlm_cache, tmp_path):
    fixture = eval_fixture()
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    items = [{"question": q, "choices": c, "label": y} for q, c, y in fixture.MC]
    (tasks / "ko_mc.json").write_text(json.dumps(items, ensure_ascii=False))
    (tasks / "utils.py").write_text(fixture.UTILS)
    (tasks / "ko_mc.yaml").write_text(textwrap.dedent(fixture.TASKS["ko_mc.yaml"]).format(dir=tasks))
    run_dir = tmp_path / "run"
    overrides = FAST + [
        f"trainer.out_dir={run_dir}",
        "trainer.max_steps=4",
        "trainer.log_interval=2",
        "trainer.eval_interval=0",
        "trainer.save_interval=100",
        "trainer.bench_tasks=[ko_mc,no_such_task]",
        "trainer.bench_interval=2",
        "trainer.bench_limit=4",
        f"trainer.bench_include_path={tasks}",
    ]
    run(deepspeed_cmd(2, overrides), ftlm_cache, timeout=600)
    log = (run_dir / "train.log").read_text()
    assert "benchmark no_such_task failed at step 2 and is skipped" in log
    assert "benchmarks at step 4: ko_mc/acc" in log
    acc = scalars(run_dir)["bench/ko_mc/acc"]
    assert sorted(acc) == [2, 4] and all(0.0 <= v <= 1.0 for v in acc.values())
    assert (run_dir / "checkpoints" / "step_00000004" / "manifest.json").is_file()  # training went on to the end
