"""lm-evaluation-harness on ftlm's own model: a fixture task of Korean multiple-choice items, a rolling-loglikelihood
task and a generation task (local JSON, include-path YAMLs) through ftlm-eval; the same requests through lm-eval's
own `hf` model on the ftlm-export of the same model give the same numbers; bad input fails before the model loads."""

import json
import math
import os
import socket
import textwrap

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'ftlm[eval]')")

from ftlm.data.tokenizer import train_tokenizer  # noqa: E402
from ftlm.eval import harness  # noqa: E402
from ftlm.eval.main import main  # noqa: E402
from ftlm.export import export, write_ftlm  # noqa: E402
from ftlm.model import GPT, GPTConfig  # noqa: E402

# 20 Korean multiple-choice items: question, four choices, the index of the right one
MC = [
    ("대한민국의 수도는 어디입니까?", ["서울", "부산", "대구", "광주"], 0),
    ("일 년은 몇 달입니까?", ["열 달", "열한 달", "열두 달", "열세 달"], 2),
    ("한글을 만든 왕은 누구입니까?", ["태조", "세종대왕", "정조", "광개토대왕"], 1),
    ("물이 얼면 무엇이 됩니까?", ["수증기", "얼음", "구름", "비"], 1),
    ("하루는 몇 시간입니까?", ["열두 시간", "스무 시간", "스물네 시간", "서른 시간"], 2),
    ("해가 뜨는 방향은 어디입니까?", ["서쪽", "남쪽", "북쪽", "동쪽"], 3),
    ("한국의 전통 음식은 무엇입니까?", ["김치", "피자", "스시", "타코"], 0),
    ("제주도는 무엇입니까?", ["산", "강", "섬", "사막"], 2),
    ("일주일은 며칠입니까?", ["닷새", "엿새", "이레", "여드레"], 2),
    ("비가 올 때 쓰는 것은 무엇입니까?", ["우산", "모자", "장갑", "안경"], 0),
    ("가장 큰 바다는 무엇입니까?", ["대서양", "인도양", "북극해", "태평양"], 3),
    ("사과의 색깔은 보통 무엇입니까?", ["파란색", "빨간색", "검은색", "보라색"], 1),
    ("겨울 다음에 오는 계절은 무엇입니까?", ["봄", "여름", "가을", "겨울"], 0),
    ("학생이 공부하는 곳은 어디입니까?", ["병원", "학교", "시장", "공항"], 1),
    ("의사가 일하는 곳은 어디입니까?", ["병원", "은행", "도서관", "극장"], 0),
    ("책을 빌리는 곳은 어디입니까?", ["식당", "우체국", "도서관", "정류장"], 2),
    ("한국의 국기는 무엇입니까?", ["성조기", "일장기", "태극기", "오성홍기"], 2),
    ("고양이는 어떻게 웁니까?", ["멍멍", "야옹", "음매", "꼬끼오"], 1),
    ("서울을 흐르는 강은 무엇입니까?", ["낙동강", "금강", "영산강", "한강"], 3),
    ("눈이 내리는 계절은 언제입니까?", ["여름", "겨울", "봄", "가을"], 1),
]
PARAGRAPHS = [
    "대한민국은 동아시아의 한반도 남부에 있는 나라이다. 수도는 서울이며, 인구의 절반 가까이가 수도권에 산다. "
    "한국어를 쓰고 한글로 적는다. 사계절이 뚜렷하고 여름에는 비가 많이 온다.",
    "한글은 세종대왕이 만든 글자이다. 자음과 모음을 모아 한 음절을 한 글자로 쓴다. 배우기 쉬워서 누구나 "
    "며칠 만에 읽을 수 있다고 한다. 한글날은 시월 구일이다.",
    "서울은 한강을 사이에 두고 남과 북으로 나뉜다. 오래된 궁궐과 높은 빌딩이 함께 있다. 지하철이 도시 "
    "곳곳을 이어 준다. The city is also home to many universities and companies.",
    "김치는 배추나 무를 소금에 절여 양념과 함께 버무린 음식이다. 겨울이 오기 전에 가족과 이웃이 모여 "
    "김장을 한다. 김치는 지역마다 맛이 조금씩 다르다.",
]
GEN = [("대한민국의 수도는", "서울"), ("한글을 만든 왕은", "세종대왕"), ("겨울 다음 계절은", "봄")]

TASKS = {
    "ko_mc.yaml": """
        task: ko_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {dir}/ko_mc.json
        output_type: multiple_choice
        test_split: test
        doc_to_text: "질문: {{{{question}}}}\\n답:"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: label
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
          - metric: f1
            aggregation: !function utils.macro_f1
            average: macro
            hf_evaluate: true
            higher_is_better: true
        metadata:
          version: 1.0
    """,
    "ko_ppl.yaml": """
        task: ko_ppl
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {dir}/ko_ppl.json
        output_type: loglikelihood_rolling
        test_split: test
        doc_to_text: ""
        doc_to_target: "{{{{text}}}}"
        metric_list:
          - metric: word_perplexity
          - metric: byte_perplexity
          - metric: bits_per_byte
        metadata:
          version: 1.0
    """,
    "ko_gen.yaml": """
        task: ko_gen
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {dir}/ko_gen.json
        output_type: generate_until
        test_split: test
        doc_to_text: "{{{{prompt}}}}"
        doc_to_target: "{{{{answer}}}}"
        generation_kwargs:
          until: ["\\n", "."]
          max_gen_toks: 12
          do_sample: false
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        metadata:
          version: 1.0
    """,
}
UTILS = """
def macro_f1(items):
    from sklearn.metrics import f1_score

    golds, preds = zip(*items)
    return f1_score(golds, preds, average="macro")
"""


def make_bench(root, llama_style: bool = False) -> dict:
    """An ftlm model directory (random weights, sharp enough that choices are far from ties), its ftlm-export (with
    the Hugging Face directory), and a folder of task YAMLs over local JSON. llama_style: rmsnorm + swiglu with a
    SentencePiece-style tokenizer that puts <s> before every text (exported as LlamaForCausalLM); otherwise
    ftlm's byte-level tokenizer and layernorm + gelu (GPTNeoXForCausalLM)."""
    texts = [q + " " + " ".join(c) for q, c, _ in MC] + PARAGRAPHS + [p + a for p, a in GEN]
    if llama_style:
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
        import sp_tokenizer  # tests/hf/sp_tokenizer.py: built locally with the tokenizers library

        (root / "tokenizer.json").write_text(sp_tokenizer.build(texts * 3, 500), encoding="utf-8")
    else:
        tok = train_tokenizer(texts * 3, 400, min_frequency=1, show_progress=False)
        tok.save(str(root / "tokenizer.json"))
    cfg = GPTConfig(
        vocab_size=768 if llama_style else 512,  # 759 tokens (256 of them bytes) or 400
        max_seq_len=64,  # the paragraphs need several rolling windows
        n_layer=2,
        n_head=4,
        n_kv_heads=2,
        d_model=64,
        norm="rmsnorm" if llama_style else "layernorm",
        mlp="swiglu" if llama_style else "gelu",
        init_std=0.1,
        attn_impl="sdpa",
        norm_impl="torch",
    )
    torch.manual_seed(0)
    state = GPT(cfg).state_dict()
    model_dir = root / "model"
    write_ftlm(model_dir, cfg, state, root / "tokenizer.json", torch.float32)
    export(model_dir, root / "export", dtype="fp32")
    # the Hugging Face model is the export directory itself (or, in the earlier layout, its hf/ folder)
    hf_dir = next(d for d in (root / "export", root / "export" / "hf") if (d / "config.json").is_file())

    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "ko_mc.json").write_text(
        json.dumps([{"question": q, "choices": c, "label": y} for q, c, y in MC], ensure_ascii=False)
    )
    (tasks / "ko_ppl.json").write_text(json.dumps([{"text": p} for p in PARAGRAPHS], ensure_ascii=False))
    (tasks / "ko_gen.json").write_text(json.dumps([{"prompt": p, "answer": a} for p, a in GEN], ensure_ascii=False))
    (tasks / "utils.py").write_text(UTILS)
    for name, text in TASKS.items():
        (tasks / name).write_text(textwrap.dedent(text).format(dir=tasks))
    return {"model": model_dir, "hf": hf_dir, "tasks": tasks, "cfg": cfg}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return make_bench(tmp_path_factory.mktemp("bench"))


@pytest.fixture(scope="module")
def llama_bench(tmp_path_factory):
    return make_bench(tmp_path_factory.mktemp("llama_bench"), llama_style=True)


def _no_network(monkeypatch):
    """Any connection attempt fails the test: everything must come from local files."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_ftlm_eval_runs_the_fixture_tasks_end_to_end(bench, tmp_path, capsys, monkeypatch):
    _no_network(monkeypatch)
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    out = tmp_path / "results.json"
    argv = [str(bench["model"]), "--tasks", "ko_mc,ko_ppl,ko_gen", "--include-path", str(bench["tasks"])]
    assert main(argv + ["--device", "cpu", "--batch-size", "3", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    # lm-eval's own table: a markdown row per metric
    assert "|Tasks" in table and "|Metric|" in table.replace(" ", "")
    for needle in ("ko_mc", "ko_ppl", "ko_gen", "acc", "f1", "bits_per_byte", "exact_match"):
        assert needle in table
    results = json.loads(out.read_text())
    assert set(results["results"]) == {"ko_mc", "ko_ppl", "ko_gen"}
    mc = results["results"]["ko_mc"]
    assert 0.0 <= mc["acc,none"] <= 1.0 and 0.0 <= mc["f1,none"] <= 1.0
    assert results["n-samples"]["ko_mc"]["effective"] == len(MC)
    # a random model over a 400-token vocabulary: several bits per byte, finite
    assert 0.5 < results["results"]["ko_ppl"]["bits_per_byte,none"] < 20
    assert results["config"]["model"] == "ftlm" and results["config"]["model_args"] == str(bench["model"])

    # --limit and --num-fewshot reach lm-eval
    assert main(argv[:2] + ["ko_mc", "--include-path", str(bench["tasks"]), "--limit", "5", "--num-fewshot", "1"]) == 0
    capsys.readouterr()


def _samples(results, task):
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


@pytest.mark.parametrize("kind", ["bench", "llama_bench"])
def test_same_numbers_as_lm_evals_hf_model_on_the_export(kind, request, monkeypatch):
    """fp32 on the CPU: per-request log-likelihoods within 1e-4, equal accuracy, equal greedy generations; with a
    Llama-style tokenizer too, whose <s> both models put first."""
    _no_network(monkeypatch)
    from lm_eval import simple_evaluate

    bench = request.getfixturevalue(kind)

    names = ["ko_mc", "ko_ppl", "ko_gen"]
    manager = harness.load_tasks(names, bench["tasks"])
    common = dict(tasks=names, task_manager=manager, batch_size=4, log_samples=True, bootstrap_iters=0)
    with harness.local_metrics():
        ours = simple_evaluate(model="ftlm", model_args=f"pretrained={bench['model']},device=cpu", **common)
        theirs = simple_evaluate(
            model="hf", model_args=f"pretrained={bench['hf']},dtype=float32", device="cpu", **common
        )

    for task in names:
        a, b = _samples(ours, task), _samples(theirs, task)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert x["arguments"] == y["arguments"]  # the same prompts
            if task == "ko_gen":
                assert x["resps"] == y["resps"]
                continue
            for (r1,), (r2,) in zip(x["resps"], y["resps"]):
                ll1, ll2 = (r1[0], r2[0]) if task == "ko_mc" else (r1, r2)
                assert math.isfinite(ll1) and abs(ll1 - ll2) < 1e-4
    assert ours["results"]["ko_mc"]["acc,none"] == theirs["results"]["ko_mc"]["acc,none"]
    assert ours["results"]["ko_mc"]["f1,none"] == pytest.approx(theirs["results"]["ko_mc"]["f1,none"])
    assert ours["results"]["ko_ppl"]["bits_per_byte,none"] == pytest.approx(
        theirs["results"]["ko_ppl"]["bits_per_byte,none"], rel=1e-5
    )
    # the choices are not near-ties, so equal accuracy is a real check: some are right, some wrong
    assert 0.0 < ours["results"]["ko_mc"]["acc,none"] < 1.0


def test_run_tasks_on_a_live_model(bench, tmp_path, monkeypatch):
    """The in-training entry point: task -> metric, the model's mode and the random streams left as they were."""
    _no_network(monkeypatch)
    from ftlm.checkpoint import load

    loaded = load(bench["model"])
    model = loaded.model.train()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    out = harness.run_tasks(model, loaded.tokenizer, ["ko_mc"], 6, torch.device("cpu"), 0, 1, bench["tasks"])
    assert set(out) == {"ko_mc"} and set(out["ko_mc"]) == {"acc", "f1"}
    assert model.training
    assert torch.equal(torch.rand(3), expected_next)  # simple_evaluate's seeding did not leak into training

    # a task that fails (its data file is gone) is reported with its error; the others' numbers still come back
    import shutil

    tasks = tmp_path / "tasks"
    shutil.copytree(bench["tasks"], tasks)
    broken = (tasks / "ko_mc.yaml").read_text().replace("task: ko_mc", "task: ko_broken")
    (tasks / "ko_broken.yaml").write_text(
        broken.replace(str(bench["tasks"] / "ko_mc.json"), str(tmp_path / "gone.json"))
    )
    with pytest.raises(harness.HarnessError, match="ko_broken") as failed:
        harness.run_tasks(model, loaded.tokenizer, ["ko_mc", "ko_broken"], 2, "cpu", 0, 1, tasks)
    assert set(failed.value.failures) == {"ko_broken"} and "gone.json" in failed.value.failures["ko_broken"]
    assert set(failed.value.results) == {"ko_mc"}


def test_a_task_that_fails_to_load_on_one_rank_is_skipped_on_every_rank(bench, monkeypatch):
    """Rank 0 of two loads the task; rank 1 (simulated: its node lacks the data) does not. Both must skip it, or the
    rank that ran it would wait forever in its first collective forward pass."""
    from ftlm.checkpoint import load

    loaded = load(bench["model"])
    monkeypatch.setattr(harness.dist, "is_initialized", lambda: True)

    def gather(out, mine):  # what rank 1 reports
        out[:] = [mine, ("HarnessError: ko_mc: data file /data/ko_mc.json not found on this node", False)]

    monkeypatch.setattr(harness.dist, "all_gather_object", gather)
    ran = []
    monkeypatch.setattr(harness, "evaluate", lambda *a, **k: ran.append(1))
    with pytest.raises(harness.HarnessError, match="on rank 1") as failed:
        harness.run_tasks(loaded.model, loaded.tokenizer, ["ko_mc"], 2, "cpu", 0, 2, bench["tasks"])
    assert ran == [] and set(failed.value.failures) == {"ko_mc"}
    assert "not found on this node" in failed.value.failures["ko_mc"]


def test_the_failing_ranks_error_is_named_not_the_peers_that_stopped(monkeypatch):
    """Rank 0 stopped because rank 1 raised (PeerFailed): both report rank 1's error, and no error means None."""
    monkeypatch.setattr(harness.dist, "is_initialized", lambda: True)
    rank1 = (ValueError("a continuation of 0 tokens cannot be scored"), False)

    def gather(out, mine):
        out[:] = [mine, ("ValueError: " + str(rank1[0]), rank1[1]) if rank1[0] is not None else (None, False)]

    monkeypatch.setattr(harness.dist, "all_gather_object", gather)
    told = harness._first_error(harness.PeerFailed(1), 0, 2)
    assert told == "on rank 1: ValueError: a continuation of 0 tokens cannot be scored"
    rank1 = (None, False)
    assert harness._first_error(None, 0, 2) is None
    assert harness._first_error(KeyError("x"), 0, 2) == "KeyError: 'x'"


def test_a_rank_that_raises_tells_the_others_in_their_next_all_reduce(bench, monkeypatch):
    """FtlmLM on rank 1 of 2 (simulated): the exception is announced once (a failure flag in the all-reduce the
    other rank waits in) and then propagates; a failure flag from another rank makes _sync raise PeerFailed."""
    from ftlm.checkpoint import load

    loaded = load(bench["model"])
    lm = harness.FtlmLM(model=loaded.model, tokenizer=loaded.tokenizer, batch_size=2, shard=(1, 2))
    sent = []

    def all_reduce(flag, op=None):
        sent.append(flag.tolist())
        if peer_failed:
            flag[1] = 1  # rank 0 failed

    monkeypatch.setattr(harness.dist, "all_reduce", all_reduce)
    peer_failed = False
    monkeypatch.setattr(harness.FtlmLM, "_greedy", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))

    class Req:
        args = ("안녕하세요", {"until": ["\n"], "max_gen_toks": 2})

    with pytest.raises(RuntimeError, match="boom"):
        lm.generate_until([Req(), Req(), Req()])
    assert sent == [[0, 2]]  # only the announcement (the failure came before this rank's first forward pass)

    sent.clear()
    peer_failed = True
    with pytest.raises(harness.PeerFailed, match="rank 0"):
        lm._loglikelihood_tokens([(None, [1, 2], [3])] * 3)  # batches of 2: this rank's share is the second
    assert sent == [[1, 0]]  # its own forward pass's all-reduce, and no announcement of its own


def test_generate_until_uses_the_kv_cache_and_stops(bench):
    """Greedy decoding with the cache equals greedy decoding by full forward passes, cut at the stop sequence."""
    from ftlm.checkpoint import load
    from ftlm.eval.generate import generate

    loaded = load(bench["model"])
    lm = harness.FtlmLM(model=loaded.model, tokenizer=loaded.tokenizer, batch_size=2)
    prompt = "대한민국의 수도는"

    class Req:
        def __init__(self, args):
            self.args = args

    ids = list(generate(loaded.model, loaded.tokenizer.encode(prompt), 10, use_cache=False))
    free = loaded.tokenizer.decode(ids, skip_special_tokens=True)
    (text,) = lm.generate_until([Req((prompt, {"until": [], "max_gen_toks": 10}))])
    assert text == free.split(loaded.tokenizer.decode([loaded.tokenizer.eot_id]))[0]
    stop = free[len(free) // 2 :][:2] or free[:1]
    (cut,) = lm.generate_until([Req((prompt, {"until": [stop], "max_gen_toks": 10}))])
    assert cut == free.split(stop)[0]
    # equal-length prompts share a batch and give what each gives alone
    both = lm.generate_until([Req((prompt, {"max_gen_toks": 6})), Req(("한글을 만든 왕", {"max_gen_toks": 6}))])
    alone = [lm.generate_until([Req((p, {"max_gen_toks": 6}))])[0] for p in (prompt, "한글을 만든 왕")]
    assert both == alone


# -- bad input: a clear error, before any model is loaded -------------------------------------------------------
@pytest.fixture
def no_model_load(monkeypatch):
    import ftlm.eval.main as cli

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(cli, "load", refuse)


def test_unknown_task_names_the_closest(bench, capsys, no_model_load, monkeypatch):
    # lm-eval's own index of ~15,000 task files takes many seconds to build: here the include path stands in for it
    # (test_unknown_lm_eval_task_names_the_closest runs the real one)
    include_only = harness._task_manager(str(bench["tasks"]), False)
    monkeypatch.setattr(harness, "_task_manager", lambda path, defaults=True: include_only)
    argv = [str(bench["model"]), "--tasks", "ko_mcc,ko_ppl,ko_g*", "--include-path", str(bench["tasks"])]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "unknown task(s)" in err and "ko_mcc (closest: ko_mc" in err and "ko_ppl (" not in err
    assert harness.check_tasks("ko_ppl,ko_g*,ko_ppl", bench["tasks"]) == ["ko_ppl", "ko_gen"]


@pytest.mark.slow
def test_unknown_lm_eval_task_names_the_closest(capsys):
    with pytest.raises(harness.HarnessError, match=r"kobest_copaa \(closest: kobest_copa"):
        harness.check_tasks(["kobest_copaa"])
    assert harness.check_tasks("kobest_*") == [
        "kobest_boolq",
        "kobest_copa",
        "kobest_hellaswag",
        "kobest_sentineg",
        "kobest_wic",
    ]


def test_empty_tasks(bench, capsys, no_model_load):
    assert main([str(bench["model"]), "--tasks", " , "]) == 1
    assert "no task given" in capsys.readouterr().err


def test_include_path_without_yaml(bench, tmp_path, capsys, no_model_load):
    (tmp_path / "notes.txt").write_text("no tasks here")
    assert main([str(bench["model"]), "--tasks", "ko_mc", "--include-path", str(tmp_path)]) == 1
    assert "no .yaml task files" in capsys.readouterr().err
    assert main([str(bench["model"]), "--tasks", "ko_mc", "--include-path", str(tmp_path / "absent")]) == 1
    assert "not a directory" in capsys.readouterr().err


def test_source_without_a_tokenizer(bench, tmp_path, capsys, no_model_load):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(bench["model"], bare)
    (bare / "tokenizer.json").unlink()
    assert main([str(bare), "--tasks", "ko_mc", "--include-path", str(bench["tasks"])]) == 1
    assert "has no tokenizer" in capsys.readouterr().err


def test_uncached_dataset_names_it_and_the_fetch_command(bench, tmp_path, capsys, no_model_load, monkeypatch):
    _no_network(monkeypatch)
    (tmp_path / "hub.yaml").write_text(
        "task: ko_hub\ndataset_path: skt/kobest_v1\ndataset_name: copa\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{premise}}'\ndoc_to_choice: ['a', 'b']\ndoc_to_target: label\n"
    )
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty_cache"))
    assert main([str(bench["model"]), "--tasks", "ko_hub", "--include-path", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "dataset skt/kobest_v1 (copa) is not in the local Hugging Face datasets cache" in err
    assert "datasets.load_dataset('skt/kobest_v1', 'copa')" in err and "HF_DATASETS_OFFLINE=0" in err


def test_missing_lm_eval_is_one_line(bench, capsys, monkeypatch):
    import builtins
    import sys

    real_import = builtins.__import__

    def without_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    import ftlm.eval

    monkeypatch.delitem(sys.modules, "ftlm.eval.harness")
    monkeypatch.delattr(ftlm.eval, "harness")
    monkeypatch.setattr(builtins, "__import__", without_lm_eval)
    assert main([str(bench["model"]), "--tasks", "ko_mc"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'ftlm[eval]'" in err


@pytest.mark.slow
def test_run_tasks_on_two_zero3_ranks(bench, tmp_path):
    """Under ZeRO-3 on two ranks: the batches are split, every forward pass has its partner on the other rank (or it
    would hang), and both ranks return what one rank alone computes with the same weights."""
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from ftlm.checkpoint import build_model, load

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port)]
    cmd += [str(root / "tests" / "eval" / "harness_worker.py"), str(bench["model"]), str(bench["tasks"]), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads((tmp_path / "ranks.json").read_text())
    assert ranks[0]["calls"] == ranks[1]["calls"] > 0
    assert ranks[0]["results"] == ranks[1]["results"]
    # The second run, where rank 1 raised after its first forward pass of ko_mc: both ranks skipped ko_mc (rank 0
    # was told in its next all-reduce), named rank 1's error, and ran the other two tasks to the same numbers.
    failed = [r["failed"] for r in ranks]
    assert failed[0] is not None and failed[1] is not None
    assert set(failed[0]["failures"]) == set(failed[1]["failures"]) == {"ko_mc"}
    assert failed[0]["failures"]["ko_mc"] == "on rank 1: RuntimeError: injected failure after a forward pass"
    assert failed[1]["failures"]["ko_mc"] == "RuntimeError: injected failure after a forward pass"
    assert failed[0]["results"] == failed[1]["results"] == {k: ranks[0]["results"][k] for k in ("ko_ppl", "ko_gen")}

    loaded = load(bench["model"])
    model = build_model(loaded.model.cfg, load_file(str(tmp_path / "weights.safetensors")))
    alone = harness.run_tasks(
        model, loaded.tokenizer, ["ko_mc", "ko_ppl", "ko_gen"], None, "cpu", 0, 1, bench["tasks"], 3
    )
    assert ranks[0]["results"].keys() == alone.keys()
    for task, metrics in alone.items():
        assert ranks[0]["results"][task] == pytest.approx(metrics, rel=1e-5)
