"""Continued pretraining (issue 11): trainer.init_from a Hugging Face Llama directory, staged unfreezing with 2 ranks
under ZeRO-3 (frozen weights bit-identical until trainer.unfreeze_at), the forgetting monitor, and a model.*
override that disagrees with the source refused before any work."""

import pytest
import torch
from launch_util import FAST, deepspeed_cmd, python_cmd, run, run_status, scalars

pytestmark = pytest.mark.slow

ROWS = ("embed.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random LlamaForCausalLM (GQA, untied head) saved with ftlm's own byte-level tokenizer beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ftlm.data import corpus
    from ftlm.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("llama") / "hf"
    texts = [d["text"] for d in corpus.korean_documents()] + [d["text"] for d in corpus.english_documents()][:100]
    tok = train_tokenizer(texts, vocab_size=512, show_progress=False)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    return out


def consolidated(ckpt):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from ftlm.checkpoint import weights_only_loading

    with weights_only_loading():
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


def test_staged_training_from_a_hugging_face_model_on_two_ranks(ftlm_cache, llama_dir, tmp_path):
    from ftlm.hf import load_pretrained

    run_dir = tmp_path / "run"
    overrides = FAST + [
        f"trainer.init_from={llama_dir}",
        "trainer.train_only=embeddings",
        "trainer.unfreeze_at=3",
        "data.mix.ko=0.9",  # continued pretraining on Korean, a little English replayed
        "data.mix.en=0.1",
        "trainer.max_steps=16",
        "trainer.log_interval=1",
        "trainer.eval_interval=16",
        "trainer.save_interval=3",
        "trainer.keep_last=10",
        "trainer.lr=3e-3",
        "trainer.warmup_steps=1",
        f"trainer.out_dir={run_dir}",
    ]
    run(deepspeed_cmd(2, overrides), ftlm_cache)
    log = (run_dir / "train.log").read_text()
    assert f"initialised from {llama_dir}; optimizer and learning-rate schedule start fresh" in log
    assert "2 layers, d_model 64, 4 heads (2 kv), vocab 512" in log  # the source's shape, not model=tiny's

    _, source, _ = load_pretrained(llama_dir)
    at3 = consolidated(run_dir / "checkpoints" / "step_00000003")
    last = consolidated(run_dir / "checkpoints" / "step_00000016")
    assert sorted(at3) == sorted(source)
    for name, value in source.items():
        if name in ROWS:
            assert not torch.equal(at3[name], value.float()), f"{name} did not train"
        else:  # frozen until step 3, bit for bit, on both ranks' partitions
            assert torch.equal(at3[name], value.float()), f"{name} moved while frozen"
    moved = [n for n in source if n not in ROWS and not torch.equal(last[n], at3[n])]
    assert len(moved) == len(source) - len(ROWS)  # unfrozen after step 3: everything trains

    # The forgetting monitor: bpb per stream at step 0, the relative change at each validation and at the end.
    tb = scalars(run_dir)
    for stream in ("ko", "en"):
        assert 0 in tb[f"val/{stream}/bpb"]
        assert sorted(tb[f"val/{stream}/bpb_delta"]) == [16]
    assert tb["val/ko/bpb"][16] < tb["val/ko/bpb"][0], tb["val/ko/bpb"]  # the continued run learns Korean
    assert "forgetting (relative change of bits per byte since step 0):" in log
    # Started from the Hugging Face tokenizer, unchanged.
    assert (run_dir / "tokenizer.json").read_bytes() == (llama_dir / "tokenizer.json").read_bytes()


def test_a_model_override_that_disagrees_with_the_source_is_refused(ftlm_cache, llama_dir, tmp_path):
    proc = run_status(
        python_cmd(FAST + [f"trainer.init_from={llama_dir}", "model.n_layer=3", f"trainer.out_dir={tmp_path / 'r'}"]),
        ftlm_cache,
    )
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "model.n_layer=3 disagrees with the model trainer.init_from starts from" in out and "n_layer=2" in out
    assert "preparing" not in out  # refused before any data work


def test_weights_that_do_not_fit_the_model_are_refused_before_the_copy():
    """check_fits runs in rank 0's reading of the source (on_rank_0), so a mismatch stops every rank with one message
    instead of stopping rank 0 inside load_into's ZeRO-3 gathers while the others wait."""
    from ftlm.config import ConfigError
    from ftlm.model import GPT, GPTConfig
    from ftlm.train.init_from import check_fits

    model = GPT(GPTConfig(vocab_size=97, max_seq_len=16, n_layer=1, n_head=2, d_model=32, tie_embeddings=False))
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    check_fits(state, model)  # the model's own weights fit

    missing = dict(state)
    lost = next(iter(missing))
    del missing[lost]
    with pytest.raises(ConfigError, match=f"the source has no weights for {lost}"):
        check_fits(missing, model)

    name = next(n for n in state if state[n].dim() == 2)
    wrong = {**state, name: torch.zeros(state[name].shape[0] + 1, state[name].shape[1])}
    with pytest.raises(ConfigError, match=f"do not fit the model: {name} is"):
        check_fits(wrong, model)

    # Under ZeRO-3 a parameter holds an empty partition; its whole shape is ds_shape.
    p = dict(model.named_parameters())[name]
    p.ds_shape, p.data = p.shape, torch.empty(0)
    check_fits(state, model)
    with pytest.raises(ConfigError, match=name):
        check_fits(wrong, model)
