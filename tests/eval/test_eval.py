"""Bits per byte: checked against values computed by hand on models whose probabilities are known."""

import json
import math

import pytest
import torch

from ftlm.data.tokenizer import Tokenizer
from ftlm.eval.loss import evaluate
from ftlm.eval.main import evaluate_files, main, token_stream, windows
from ftlm.model import GPT, GPTConfig

KO = "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다."
EN = ["The function returns the sum of its arguments.", "Seoul is the capital of Korea.", "똠방각하 뷁"]


class FixedDistribution(torch.nn.Module):
    """Predicts the same distribution q at every position, whatever the input: p(next = i) = q[i]."""

    def __init__(self, q: torch.Tensor):
        super().__init__()
        self.log_q = q.log()

    def forward(self, x):
        return self.log_q.expand(*x.shape, -1), None


@pytest.fixture(scope="module")
def tok(tiny_run_dir):
    return Tokenizer.load(tiny_run_dir / "tokenizer.json")


@pytest.fixture
def files(tmp_path):
    ko = tmp_path / "ko.txt"
    ko.write_text(KO, encoding="utf-8")
    en = tmp_path / "en.jsonl"
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in EN]
    en.write_text("\n".join([lines[0], "{broken", lines[1], '{"title": "no text"}', lines[2]]) + "\n", encoding="utf-8")
    return ko, en


def test_uniform_model_gives_log2_vocab_bits_per_token(tok, files):
    """A GPT with a zero LM head puts 1/V on every token: exactly log2(V) bits for each predicted token."""
    cfg = GPTConfig(vocab_size=512, max_seq_len=64, n_layer=1, n_head=2, d_model=32, tie_embeddings=False)
    model = GPT(cfg)
    torch.nn.init.zeros_(model.lm_head.weight)
    ko, en = files
    results = evaluate_files(model, tok, [ko, en], seq_len=7, batch_size=2, device=torch.device("cpu"))
    for path, texts in ((ko, [KO]), (en, EN)):
        n_tokens = sum(len(tok.encode(t)) for t in texts)
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)  # UTF-8 bytes of the text itself, not of tokens
        r = results[str(path)]
        assert (r["tokens"], r["bytes"]) == (n_tokens, n_bytes)
        assert r["loss"] == pytest.approx(math.log(512), rel=1e-6)
        assert r["bpb"] == pytest.approx(n_tokens * math.log2(512) / n_bytes, rel=1e-6)
    all_tokens = sum(len(tok.encode(t)) for t in [KO, *EN])
    all_bytes = sum(len(t.encode("utf-8")) for t in [KO, *EN])
    assert results["overall"]["bpb"] == pytest.approx(all_tokens * 9 / all_bytes, rel=1e-6)


def test_known_distribution_counts_every_text_token_once(tok, files):
    """With a fixed non-uniform q, the loss is -sum(log q[token]) over the text's tokens, end-of-text excluded:
    a window that skips, repeats or shifts a token gives another sum."""
    q = torch.softmax(torch.randn(512, generator=torch.Generator().manual_seed(0)) * 2, dim=0)
    ko, en = files
    for seq_len, batch_size in ((5, 3), (64, 8), (1, 1)):
        results = evaluate_files(FixedDistribution(q), tok, [en], seq_len, batch_size, torch.device("cpu"))
        ids = [i for t in EN for i in tok.encode(t)]
        nats = -sum(math.log(q[i].item()) for i in ids)
        n_bytes = sum(len(t.encode("utf-8")) for t in EN)
        assert results[str(en)]["loss"] == pytest.approx(nats / len(ids), rel=1e-6)
        assert results[str(en)]["bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-6)


def test_windows_predict_each_position_once():
    ids = torch.arange(23)
    targets = ids.clone()
    seen = []
    for x, y in windows(ids, targets, seq_len=6, batch_size=2):
        assert x.shape == y.shape
        assert torch.equal(y, x + 1)  # targets are the next token of the inputs
        seen += y.flatten().tolist()
    assert seen == list(range(1, 23))


def test_end_of_text_is_context_only(tok):
    ids, targets = token_stream(["ab", "cd"], tok)
    assert ids[0] == tok.eot_id and (ids == tok.eot_id).sum() == 2
    assert (targets == -100).sum() == 2
    assert ids[targets != -100].tolist() == tok.encode("ab") + tok.encode("cd")


def test_evaluate_takes_trainer_batches_and_pairs_alike(tok):
    model = FixedDistribution(torch.softmax(torch.randn(512), dim=0))
    batch = torch.randint(2, 400, (3, 9))
    token_bytes = tok.token_byte_lengths()
    as_tensor = evaluate(model, {"s": [batch]}, torch.device("cpu"), token_bytes)
    as_pair = evaluate(model, {"s": [(batch[:, :-1], batch[:, 1:])]}, torch.device("cpu"), token_bytes)
    assert as_tensor == pytest.approx(as_pair)
    assert set(as_tensor) == {"val/s/loss", "val/s/bpb", "val/loss"}


def test_cli_on_a_run_dir(tiny_run_dir, files, tmp_path, capsys, caplog):
    ko, en = files
    out = tmp_path / "results.json"
    assert main([str(tiny_run_dir), str(ko), str(en), "--seq-len", "16", "--batch-size", "2", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert str(ko) in table and str(en) in table and "overall" in table and "bits/byte" in table
    assert "skipped 2 malformed line(s)" in caplog.text and "en.jsonl:2" in caplog.text
    results = json.loads(out.read_text())
    assert results["overall"]["tokens"] == results[str(ko)]["tokens"] + results[str(en)]["tokens"]
    # an untrained model over a 400-token vocabulary: about log(400) nats per token, never 0 or inf
    for r in results.values():
        assert 4.0 < r["loss"] < 8.0 and 0.5 < r["bpb"] < 6.0


def test_cli_errors(tiny_run_dir, tmp_path, capsys):
    assert main([str(tiny_run_dir), str(tmp_path / "absent.txt")]) == 1
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "a.txt").write_text("x")
    assert main([str(tiny_run_dir), str(tmp_path / "a.txt"), "--seq-len", "1000"]) == 1
    assert "longer than model.max_seq_len=64" in capsys.readouterr().err
