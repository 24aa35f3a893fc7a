"""Generation: the KV cache changes nothing but the cost, the sampling filters, end-of-text, streaming, the CLI."""

import pytest
import torch

from ftlm.data.tokenizer import Tokenizer
from ftlm.eval.generate import StreamDecoder, generate, main, sample
from ftlm.model import GPT, GPTConfig

PROMPT = [5, 77, 301, 12, 9, 140, 33]  # 7 tokens: an odd length


def tiny_model(seed=0, **overrides) -> GPT:
    cfg = GPTConfig(
        **{
            **dict(
                vocab_size=512,
                max_seq_len=64,
                n_layer=2,
                n_head=4,
                n_kv_heads=2,
                d_model=64,
                attn_impl="sdpa",
                norm_impl="torch",
                init_std=0.2,
            ),
            **overrides,
        }
    )
    torch.manual_seed(seed)
    return GPT(cfg).eval()


@pytest.mark.parametrize("norm,mlp", [("layernorm", "gelu"), ("rmsnorm", "swiglu")])
def test_kv_cache_equals_no_cache_greedy(norm, mlp):
    model = tiny_model(norm=norm, mlp=mlp)
    with_cache = list(generate(model, PROMPT, 30, use_cache=True))
    without = list(generate(model, PROMPT, 30, use_cache=False))
    assert len(with_cache) == 30 and with_cache == without
    assert len(set(with_cache)) > 3  # not one token repeated: the comparison means something


def test_kv_cache_equals_no_cache_sampling():
    model = tiny_model(1)
    runs = [
        list(
            generate(
                model,
                PROMPT,
                30,
                temperature=1.0,
                top_k=100,
                top_p=0.9,
                use_cache=c,
                generator=torch.Generator().manual_seed(7),
            )
        )
        for c in (True, False)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != list(generate(model, PROMPT, 30))  # sampling, not greedy


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = tiny_model(2)
    greedy = list(generate(model, PROMPT, 20))
    g = torch.Generator().manual_seed(0)
    assert list(generate(model, PROMPT, 20, temperature=1.5, top_k=1, generator=g)) == greedy
    assert list(generate(model, PROMPT, 20, temperature=1.5, top_p=1e-6, generator=g)) == greedy


def test_sampling_filters_keep_only_allowed_tokens():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    g = torch.Generator().manual_seed(0)
    top_k = {int(sample(logits, 1.0, 2, 1.0, g)) for _ in range(300)}
    assert top_k == {1, 3}
    top_p = {int(sample(logits, 1.0, 0, 0.7, g)) for _ in range(300)}  # 0.5 + 0.3 reach 0.7: tokens 1 and 3
    assert top_p == {1, 3}
    everything = {int(sample(logits, 1.0, 0, 1.0, g)) for _ in range(300)}
    assert everything == {0, 1, 2, 3}


def test_stops_at_eos():
    model = tiny_model(3)
    free = list(generate(model, PROMPT, 30))
    eos = free[4]
    first = free.index(eos)
    stopped = list(generate(model, PROMPT, 30, eos_id=eos))
    assert stopped == free[: first + 1]


def test_never_runs_past_max_seq_len():
    model = tiny_model(4, max_seq_len=16)
    assert len(list(generate(model, PROMPT, 100))) == 16 - len(PROMPT)
    with pytest.raises(ValueError, match="more than model.max_seq_len=16"):
        list(generate(model, list(range(17)), 1))


def test_cost_is_linear_in_new_tokens():
    """Counted, not timed: with the cache every step feeds one token; without it every step feeds them all."""
    model = tiny_model(5)
    fed = []
    model.register_forward_pre_hook(lambda m, args, kwargs: fed.append(args[0].shape[1]), with_kwargs=True)
    n, p = 40, len(PROMPT)
    list(generate(model, PROMPT, n, use_cache=True))
    assert len(fed) == n and sum(fed) == p + n - 1 and fed[1:] == [1] * (n - 1)
    fed.clear()
    list(generate(model, PROMPT, n, use_cache=False))
    assert sum(fed) == sum(p + i for i in range(n))  # quadratic: what the cache avoids


def test_eval_mode_during_generation_and_restored():
    model = tiny_model(6, dropout=0.5).train()
    assert list(generate(model, PROMPT, 10)) == list(generate(model, PROMPT, 10))  # no dropout noise
    assert model.training


def test_stream_decoder_never_prints_half_a_syllable(tiny_run_dir):
    tok = Tokenizer.load(tiny_run_dir / "tokenizer.json")
    text = "똠방각하 뷁! 대한민국은 민주공화국이다. Hello, 세계"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some syllable really is split across tokens
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "" in pieces  # something was held back ...
    assert all("\ufffd" not in p for p in pieces)  # ... and nothing broken was printed
    assert "".join(pieces) + stream.flush() == text


@pytest.mark.parametrize("legacy", [False, True], ids=["metaspace", "legacy_llama2"])
def test_stream_decoder_keeps_the_spaces_a_sentencepiece_tokenizer_writes_into_its_tokens(legacy):
    """Llama-2 / Mistral tokenizers write a word's leading space as "▁" inside its token and drop it when a token is
    decoded on its own: each piece is decoded after the ids before it (the prompt's first), so the printed text is
    the text of the whole sequence, prompt and continuation, and the sampler's text is the same."""
    import sys
    from pathlib import Path

    from tokenizers import Tokenizer as HFTok

    from ftlm.data import corpus
    from ftlm.eval.generate import continuation

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
    import sp_tokenizer  # tests/hf/sp_tokenizer.py: built locally with the tokenizers library

    english = [d["text"] for d in corpus.english_documents()][:150]
    tok = Tokenizer(HFTok.from_str(sp_tokenizer.build(english, 600, legacy=legacy)))
    prompt, rest = "The function returns", " the value of the argument, 대한민국 and a list."
    prompt_ids = tok.encode_document(prompt)
    ids = tok.encode(prompt + rest)[len(tok.encode(prompt)) :]
    assert tok.decode(ids[:1]) != tok.decode(prompt_ids + ids[:1], skip_special_tokens=True)[len(prompt) :]
    stream = StreamDecoder(tok, prompt_ids)
    pieces = [stream.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)  # Korean falls back to bytes here: held until whole
    assert prompt + "".join(pieces) + stream.flush() == prompt + rest
    assert continuation(tok, prompt_ids, ids) == rest
    assert continuation(tok, [tok.bos_id], ids[1:])[0] != " "  # a new document's first word has no space before it


def test_cli_streams_greedy_continuation(tiny_run_dir, capsys):
    assert (
        main(
            [
                str(tiny_run_dir),
                "--prompt",
                "대한민국은",
                "--max-new-tokens",
                "8",
                "--temperature",
                "0",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("대한민국은") and out.endswith("\n")
    from ftlm.checkpoint import load

    loaded = load(tiny_run_dir)
    ids = list(generate(loaded.model, loaded.tokenizer.encode("대한민국은"), 8, eos_id=loaded.tokenizer.eot_id))
    expected = loaded.tokenizer.decode([i for i in ids if i != loaded.tokenizer.eot_id], skip_special_tokens=True)
    assert out == "대한민국은" + expected + "\n"


def test_cli_error_for_missing_checkpoint(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), "--prompt", "x"]) == 1
    assert "missing does not exist" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kv_cache_equals_no_cache_on_gpu():
    model = tiny_model(7).cuda()
    assert list(generate(model, PROMPT, 20)) == list(generate(model, PROMPT, 20, use_cache=False))
    g = torch.Generator().manual_seed(0)  # a CPU generator drives a GPU model
    assert len(list(generate(model, PROMPT, 5, temperature=1.0, generator=g))) == 5


# -- the edges of ftlm-generate: an empty prompt, one longer than the context, nothing to generate ----------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An ftlm model directory (what ftlm-export writes) holding tiny_model(8) and a small trained tokenizer."""
    from ftlm.data.tokenizer import train_tokenizer
    from ftlm.export import write_ftlm

    root = tmp_path_factory.mktemp("gen_model")
    texts = ["대한민국은 민주공화국이다.", "서울은 한국의 수도이다.", "Hello, world. The quick brown fox."]
    train_tokenizer(texts * 4, 300, min_frequency=1, show_progress=False).save(str(root / "tokenizer.json"))
    model = tiny_model(8)
    write_ftlm(root / "model", model.cfg, model.state_dict(), root / "tokenizer.json", torch.float32)
    return root / "model"


def _greedy_text(model_dir, prompt_ids, n):
    from ftlm.checkpoint import load

    loaded = load(model_dir)
    tok = loaded.tokenizer
    ids = list(generate(loaded.model, prompt_ids, n, eos_id=tok.eot_id))
    return tok.decode([i for i in ids if i != tok.eot_id], skip_special_tokens=True)


def test_empty_prompt_starts_a_new_document(model_dir, capsys):
    from ftlm.data.tokenizer import Tokenizer

    tok = Tokenizer.load(model_dir / "tokenizer.json")
    assert main([str(model_dir), "--prompt", "", "--max-new-tokens", "6", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == _greedy_text(model_dir, [tok.eot_id], 6) + "\n"


def test_prompt_longer_than_the_context_keeps_its_end(model_dir, capsys, caplog):
    from ftlm.data.tokenizer import Tokenizer

    tok = Tokenizer.load(model_dir / "tokenizer.json")
    prompt = "대한민국은 민주공화국이다. " * 20
    ids = tok.encode(prompt)
    assert len(ids) > 64  # model.max_seq_len
    assert main([str(model_dir), "--prompt", prompt, "--max-new-tokens", "5", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert f"the prompt has {len(ids)} tokens; the model sees its last 63" in caplog.text
    assert "generating at most 1 tokens" in caplog.text
    assert out == prompt + _greedy_text(model_dir, ids[-63:], 1) + "\n"


def test_max_new_tokens_0_prints_the_prompt(model_dir, capsys, caplog):
    caplog.set_level("INFO", logger="ftlm.eval.generate")
    assert main([str(model_dir), "--prompt", "대한민국은", "--max-new-tokens", "0"]) == 0
    assert capsys.readouterr().out == "대한민국은\n"
    assert "nothing to generate" in caplog.text
    with pytest.raises(SystemExit):
        main([str(model_dir), "--prompt", "x", "--max-new-tokens", "-1"])
    assert "must not be negative" in capsys.readouterr().err
