"""Vocabulary extension of an imported model: new rows (model.new_token_init) and the step-0 distribution."""

from __future__ import annotations

import pytest
import torch
from hf_models import llama
from tokenizers import Tokenizer as HFTok

from ftlm.checkpoint import build_model
from ftlm.data.tokenizer import Tokenizer, extend_tokenizer, train_tokenizer
from ftlm.hf import load_pretrained, resize_vocab, subtoken_ids


@pytest.fixture(scope="module")
def trained_llama(tmp_path_factory, sp_tokenizer_json, english, korean):
    """A tiny Llama trained for a few seconds on English only, so that, like Llama-2 (0.06% Korean), it puts little
    probability on Korean bytes after English text; saved as a Hugging Face directory."""
    from transformers import AutoModelForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a module fixture runs before the autouse one-thread fixture; tiny matmuls want one
    path = llama(tmp_path_factory.mktemp("trained") / "llama", sp_tokenizer_json, seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():  # back to a normal init scale: randomize() is for mapping tests
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * 0.05)
    tok = Tokenizer(HFTok.from_str(sp_tokenizer_json))
    stream = []
    for text in english[:100]:
        stream += tok.encode(text) + [tok.eot_id]
    data = torch.tensor(stream)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(200):
        starts = torch.randint(0, len(data) - 65, (8,), generator=gen)
        batch = torch.stack([data[s : s + 65] for s in starts])
        loss = model(batch[:, :-1], labels=batch[:, :-1]).loss  # transformers shifts the labels itself
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(path, safe_serialization=True)
    torch.set_num_threads(threads)
    return path, loss.item()


def folded_kl(p_ext: torch.Tensor, p_orig: torch.Tensor, first_piece: torch.Tensor, n_old: int) -> torch.Tensor:
    """KL(extended || original) per position. The extended model's probability of a new token is the probability of
    starting to spell it, so it is added to its first old piece; KL(q || p) = sum q log(q / p)."""
    q = torch.zeros_like(p_orig)
    q[..., :n_old] = p_ext[..., :n_old]
    new = p_ext[..., n_old : n_old + len(first_piece)]
    q.index_add_(-1, first_piece, new)
    q = q / q.sum(-1, keepdim=True)  # the few padding rows past the new tokens, if any, hold ~nothing
    return (q * (q.clamp_min(1e-30).log() - p_orig.log())).sum(-1)


def test_extension_at_step_0_keeps_english_and_shortens_korean(trained_llama, english, korean):
    path, final_loss = trained_llama
    cfg, state, tok_path = load_pretrained(path)
    old = Tokenizer.load(tok_path)
    # ~420 new tokens on 859 (Llama-2-Ko: 14,336 on 32,000)
    extended = extend_tokenizer(old, korean, new_vocab_size=500, show_progress=False)
    assert extended.vocab_size % 64 == 0  # trimmed to a multiple of 64: no padding rows needed

    held_out = [t for t in english[100:150] if t.isascii()][:12]
    ids = [extended.encode(t)[:96] for t in held_out]
    assert all(extended.encode(t) == old.encode(t) for t in held_out)  # English encodes as before
    batch = torch.tensor([x + [old.eot_id] * (96 - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (96 - len(x)) for x in ids], dtype=torch.bool)

    original = build_model(cfg, state)
    with torch.no_grad():
        p_orig = original(batch)[0].softmax(-1)
    first_piece = torch.tensor([subtoken_ids(old, extended, t)[0] for t in range(old.vocab_size, extended.vocab_size)])
    results = {}
    for init in ("subtoken_mean", "vocab_mean", "normal"):
        new_state, new_cfg = resize_vocab(state, cfg, None, init, old, extended)
        assert new_cfg.vocab_size == extended.vocab_size and new_cfg.vocab_size % 64 == 0
        for name in ("embed.weight", "lm_head.weight"):
            assert torch.equal(new_state[name][: old.vocab_size], state[name][: old.vocab_size])
        with torch.no_grad():
            p_ext = build_model(new_cfg, new_state)(batch)[0].softmax(-1)
        kl = folded_kl(p_ext, p_orig, first_piece, old.vocab_size)[mask].mean().item()
        mass = p_ext[..., old.vocab_size :].sum(-1)[mask].mean().item()
        results[init] = (kl, mass)
    ko_before, ko_after = old.tokens_per_char(korean), extended.tokens_per_char(korean)
    print(
        f"\nfinal training loss {final_loss:.2f}; vocabulary {old.vocab_size} -> {extended.vocab_size}; Korean tokens "
        f"per character {ko_before:.3f} -> {ko_after:.3f} (ratio {ko_after / ko_before:.3f})"
    )
    for init, (kl, mass) in results.items():
        print(f"  {init:14s} KL(extended || original) on English = {kl:.5f} nats/token, new-token mass {mass:.5f}")
    # The KL depends on the tiny trained model (0.008 here with torch 2.14, 0.012 with torch 2.11 and transformers
    # 5): bounded, and an order of magnitude below the other two rules on the same model.
    assert results["subtoken_mean"][0] <= 0.02
    assert results["subtoken_mean"][0] < 0.1 * min(results["vocab_mean"][0], results["normal"][0])
    assert ko_after < 0.6 * ko_before


def test_resize_vocab_rows_and_padding(sp_tokenizer_json, korean):
    old = Tokenizer(HFTok.from_str(sp_tokenizer_json))
    extended = extend_tokenizer(old, korean[:30], new_vocab_size=900, show_progress=False, multiple_of=1)
    from ftlm.model import GPTConfig

    cfg = GPTConfig(vocab_size=896, n_layer=1, n_head=2, d_model=16, norm="rmsnorm", mlp="swiglu",
                    tie_embeddings=False)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    state = {"embed.weight": torch.randn(896, 16, generator=gen), "lm_head.weight": torch.randn(896, 16, generator=gen)}
    n_old, n_new = old.vocab_size, extended.vocab_size
    assert n_new % 64 != 0 and n_new > 896  # padding rows needed
    out, new_cfg = resize_vocab(state, cfg, None, "subtoken_mean", old, extended)
    V = new_cfg.vocab_size
    assert V % 64 == 0 and V >= n_new and V - n_new < 64
    for name, w in state.items():
        new = out[name]
        assert new.shape == (V, 16) and torch.equal(new[:n_old], w[:n_old])
        for t in (n_old, n_old + 1, n_new - 1):
            pieces = subtoken_ids(old, extended, t)
            assert pieces and all(p < n_old for p in pieces)
            assert extended.decode([t]).strip() == old.decode(pieces).strip()  # the pieces spell the token
            torch.testing.assert_close(new[t], w[pieces].mean(0))
        torch.testing.assert_close(new[n_new:], w[:n_old].mean(0).expand(V - n_new, 16))  # padding: the mean row

    mean_init, _ = resize_vocab(state, cfg, None, "vocab_mean", old, extended)
    torch.testing.assert_close(mean_init["embed.weight"][n_old], state["embed.weight"][:n_old].mean(0))
    normal, _ = resize_vocab(state, cfg, None, "normal", old, extended)
    assert abs(normal["embed.weight"][n_old:n_new].std().item() - cfg.init_std) < 0.005

    with pytest.raises(ValueError, match="not one of subtoken_mean, vocab_mean, normal"):
        resize_vocab(state, cfg, None, "copy", old, extended)
    with pytest.raises(ValueError, match="smaller than the old one"):
        resize_vocab(state, cfg, None, "vocab_mean", extended, old)
    another = train_tokenizer(korean[:30], vocab_size=1000, show_progress=False)  # a new tokenizer, not an extension
    with pytest.raises(ValueError, match="does not keep the old ids"):
        resize_vocab(state, cfg, None, "vocab_mean", old, another)


def test_import_extend_export_round_trip_stays_llama(tmp_path, sp_tokenizer_json, korean):
    """import -> extend the tokenizer -> new rows -> ftlm-export: a LlamaForCausalLM again, with the larger vocabulary,
    computing what ftlm computes, and its tokenizer splitting Korean as ftlm's does (training sits in between)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftlm.checkpoint import load
    from ftlm.export import export, write_ftlm

    src = llama(tmp_path / "src", sp_tokenizer_json)
    cfg, state, tok_path = load_pretrained(src)
    old = Tokenizer.load(tok_path)
    extended = extend_tokenizer(old, korean, new_vocab_size=500, show_progress=False)
    extended.save(str(tmp_path / "tokenizer.json"))
    new_state, new_cfg = resize_vocab(state, cfg, None, "subtoken_mean", old, extended)
    write_ftlm(tmp_path / "ftlm", new_cfg, new_state, tmp_path / "tokenizer.json", torch.float32)
    export(tmp_path / "ftlm", tmp_path / "out", dtype="fp32")

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.vocab_size == new_cfg.vocab_size
    text = "대한민국은 민주공화국이다. The state is a republic."
    ids = extended.encode(text)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    assert max(ids) >= old.vocab_size  # new tokens are used
    with torch.no_grad():
        ours = load(tmp_path / "out").model(torch.tensor([ids]))[0]
        theirs = hf(torch.tensor([ids])).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
