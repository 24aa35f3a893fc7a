"""Bits per byte: checked against values computed by hand on models whose probabilities are known; documents
masked as in training; files that are not UTF-8 refused, never scored as replacement characters."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from ftlm.data.batch import Batch
from ftlm.data.tokenizer import Tokenizer, train_tokenizer
from ftlm.eval.loss import evaluate
from ftlm.eval.main import UnreadableFile, evaluate_files, main, read_documents, token_stream, windows
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
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer([KO, *EN] * 4, 400, min_frequency=1, show_progress=False).save(str(path))
    return Tokenizer.load(path)


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory):
    """An ftlm model directory (what ftlm-export writes), random weights."""
    from ftlm.export import write_ftlm

    root = tmp_path_factory.mktemp("model")
    tok.save(str(root / "tokenizer.json"))
    cfg = GPTConfig(
        vocab_size=512, max_seq_len=64, n_layer=1, n_head=2, d_model=32, attn_impl="sdpa", norm_impl="torch"
    )
    torch.manual_seed(0)
    write_ftlm(root / "model", cfg, GPT(cfg).state_dict(), root / "tokenizer.json", torch.float32)
    return root / "model"


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
    for batch in windows(ids, targets, seq_len=6, batch_size=2):
        assert batch.inputs.shape == batch.targets.shape == batch.positions.shape
        assert torch.equal(batch.targets, batch.inputs + 1)  # targets are the next token of the inputs
        seen += batch.targets.flatten().tolist()
    assert seen == list(range(1, 23))


def test_end_of_text_is_context_only(tok):
    ids, targets, starts = token_stream(["ab", "cd"], tok)
    assert ids[0] == tok.eot_id and (ids == tok.eot_id).sum() == 2
    assert (targets == -100).sum() == 2
    assert ids[targets != -100].tolist() == tok.encode("ab") + tok.encode("cd")
    assert starts == [1, 2 + len(tok.encode("ab"))]  # each document's first token, after its end-of-text


def test_a_llama_style_document_starts_with_bos_which_is_context_only():
    import sys
    from pathlib import Path

    from tokenizers import Tokenizer as HFTok

    from ftlm.data.tokenizer import Tokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
    import sp_tokenizer

    sp = Tokenizer(HFTok.from_str(sp_tokenizer.build(["ab cd ef gh"] * 20, 300)))
    ids, targets, starts = token_stream(["ab", "cd"], sp)
    assert sp.adds_bos and ids[starts].tolist() == [sp.bos_id, sp.bos_id]  # a document begins with BOS
    assert ids[targets != -100].tolist() == sp.encode("ab") + sp.encode("cd")  # only text is scored


def test_windows_carry_document_boundaries(tok):
    """Positions restart at each document's first token, as the training loader places them; cu_seqlens holds those
    starts and every window's own start."""
    docs = ["대한민국은 민주공화국이다.", "Seoul is the capital of Korea.", "똠방각하"]
    ids, targets, starts = token_stream(docs, tok)
    batches = list(windows(ids, targets, seq_len=9, batch_size=2, starts=starts))
    seen = 0
    for batch in batches:
        b, s = batch.inputs.shape
        cu = batch.cu_seqlens.tolist()
        assert batch.cu_seqlens.dtype == torch.int32 and cu[0] == 0 and cu[-1] == b * s
        for row in range(b):
            begin = seen + row * s  # where this window starts in the stream
            expected = [i - max([begin] + [d for d in starts if d <= i]) for i in range(begin, begin + s)]
            assert batch.positions[row].tolist() == expected
            assert set(range(row * s, (row + 1) * s)) & set(cu) == {row * s + i for i in range(s) if expected[i] == 0}
        seen += b * s


def test_evaluate_takes_batches_tensors_and_pairs_alike(tok):
    model = FixedDistribution(torch.softmax(torch.randn(512), dim=0))
    rows = torch.randint(2, 400, (3, 9))
    token_bytes = tok.token_byte_lengths()
    cpu = torch.device("cpu")
    as_tensor = evaluate(model, {"s": [rows]}, cpu, token_bytes)
    as_pair = evaluate(model, {"s": [(rows[:, :-1], rows[:, 1:])]}, cpu, token_bytes)
    as_batch = evaluate(model, {"s": [Batch.from_rows(rows)]}, cpu, token_bytes)
    assert as_tensor == pytest.approx(as_pair) and as_batch == pytest.approx(as_pair)
    assert set(as_tensor) == {"val/s/loss", "val/s/bpb", "val/loss"}


def _nll(logits: torch.Tensor, target: list[int]) -> float:
    return -F.log_softmax(logits.float(), dim=-1).gather(-1, torch.tensor(target)[:, None]).sum().item()


@torch.no_grad()
def test_doc_masked_model_scores_each_document_as_in_training(tok, tmp_path):
    """With model.doc_mask, a file's loss is what the model gives each document alone (positions from 0, no earlier
    document in view), the first token of each predicted by the end-of-text closing the document before it, as the
    training loader lays documents out. Without doc_mask the same weights see across documents: another number."""
    docs = ["대한민국은 민주공화국이다.", "Seoul is the capital of Korea.", "똠방각하 뷁!"]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": d}, ensure_ascii=False) for d in docs))
    cfg = dict(vocab_size=512, max_seq_len=64, n_layer=2, n_head=2, d_model=32, init_std=0.2, attn_impl="sdpa")
    torch.manual_seed(0)
    masked = GPT(GPTConfig(**cfg, doc_mask=True)).eval()
    plain = GPT(GPTConfig(**cfg, doc_mask=False)).eval()
    plain.load_state_dict(masked.state_dict())

    nats, before = 0.0, []
    for ids in tok.encode_batch(docs):
        context = torch.tensor([before + [tok.eot_id]])  # the document before, closed by end-of-text
        nats += _nll(plain(context)[0][0, -1:], ids[:1])
        nats += _nll(plain(torch.tensor([ids[:-1]]))[0][0], ids[1:]) if len(ids) > 1 else 0.0
        before = ids
    n_tokens = sum(len(i) for i in tok.encode_batch(docs))
    cpu = torch.device("cpu")
    got = evaluate_files(masked, tok, [path], seq_len=64, batch_size=1, device=cpu)[str(path)]
    assert got["tokens"] == n_tokens
    assert got["loss"] == pytest.approx(nats / n_tokens, rel=1e-5)
    across = evaluate_files(plain, tok, [path], seq_len=64, batch_size=1, device=cpu)[str(path)]
    assert across["loss"] != pytest.approx(got["loss"], rel=1e-4)


# -- files that are not UTF-8 text -----------------------------------------------------------------------------
KO_PLAIN = "대한민국은 민주공화국이다. 모든 권력은 국민으로부터 나온다."


@pytest.fixture
def encoded(tmp_path):
    files = {
        "euckr.txt": KO_PLAIN.encode("euc-kr"),
        "utf16.txt": KO_PLAIN.encode("utf-16"),  # with a byte-order mark
        "utf16le.txt": KO_PLAIN.encode("utf-16-le"),  # without one
        "binary.txt": bytes(range(256)) * 4,
        "utf16.jsonl": (json.dumps({"text": KO_PLAIN}, ensure_ascii=False) + "\n").encode("utf-16"),
        "euckr.jsonl": (json.dumps({"text": KO_PLAIN}, ensure_ascii=False) + "\n").encode("euc-kr"),
        "bom.txt": KO_PLAIN.encode("utf-8-sig"),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


@pytest.mark.parametrize(
    "name,message",
    [
        ("euckr.txt", "reads as EUC-KR/CP949: convert it with `iconv -f CP949 -t UTF-8"),
        ("utf16.txt", "UTF-16 text (it starts with a byte-order mark)"),
        ("utf16le.txt", "UTF-16 text without a byte-order mark"),
        ("binary.txt", "binary data"),
        ("utf16.jsonl", "UTF-16"),
        ("euckr.jsonl", "EUC-KR"),
    ],
)
def test_non_utf8_files_are_refused_naming_the_encoding(encoded, name, message):
    with pytest.raises(UnreadableFile, match="not UTF-8") as refused:
        read_documents(encoded / name)
    assert str(encoded / name) in str(refused.value) and message in str(refused.value)


def test_utf8_with_a_byte_order_mark_is_read(encoded):
    assert read_documents(encoded / "bom.txt") == [KO_PLAIN]


def test_a_jsonl_line_that_is_not_utf8_is_skipped_and_counted(tmp_path, caplog):
    good = json.dumps({"text": KO_PLAIN}, ensure_ascii=False)
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(good.encode() + b"\n" + good.encode("euc-kr") + b"\n" + good.encode() + b"\n")
    assert read_documents(path) == [KO_PLAIN, KO_PLAIN]
    assert (
        "skipped 1 malformed line(s)" in caplog.text and "1 not UTF-8" in caplog.text and "mixed.jsonl:2" in caplog.text
    )


def test_cli_refuses_undecodable_files_and_scores_the_rest(model_dir, encoded, tmp_path, capsys):
    good = tmp_path / "good.txt"
    good.write_text(KO_PLAIN, encoding="utf-8")
    out = tmp_path / "r.json"
    argv = [str(model_dir), str(encoded / "euckr.txt"), str(good), str(encoded / "utf16.txt"), "--json", str(out)]
    assert main(argv) == 1  # not everything was scored
    captured = capsys.readouterr()
    assert str(good) in captured.out and "euckr.txt" not in captured.out and "utf16.txt" not in captured.out
    assert "2 file(s) not scored" in captured.err and "EUC-KR" in captured.err and "UTF-16" in captured.err
    results = json.loads(out.read_text())
    assert results["overall"]["tokens"] == results[str(good)]["tokens"]  # the refused files pollute nothing
    assert set(results["refused"]) == {str(encoded / "euckr.txt"), str(encoded / "utf16.txt")}
    # the same text in UTF-8 and in EUC-KR: the first scored, the second never as replacement characters
    assert results[str(good)]["bytes"] == len(KO_PLAIN.encode("utf-8"))


def test_cli_exits_nonzero_when_nothing_was_scored(model_dir, encoded, tmp_path, capsys):
    assert main([str(model_dir), str(encoded / "binary.txt"), str(encoded / "utf16le.txt")]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "nothing was scored (2 file(s) refused)" in captured.err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main([str(model_dir), str(empty)]) == 1
    assert "nothing was scored" in capsys.readouterr().err


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
