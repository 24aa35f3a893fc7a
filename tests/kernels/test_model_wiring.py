"""The model through the Triton kernels computes what it computes through PyTorch's ops."""

import subprocess
import sys

import pytest
import torch

from ftlm.model import GPT, GPTConfig


@pytest.mark.parametrize("norm,kv", [("layernorm", 2), ("rmsnorm", 1)])
def test_model_with_triton_kernels_matches_sdpa_and_torch_norms(device, rel_err, norm, kv):
    torch.manual_seed(0)
    cfg = dict(vocab_size=101, max_seq_len=64, n_layer=2, n_head=4, n_kv_heads=kv, d_model=64, norm=norm, bias=True)
    reference_model = GPT(GPTConfig(**cfg, attn_impl="sdpa", norm_impl="torch")).to(device)
    triton_model = GPT(GPTConfig(**cfg, attn_impl="triton", norm_impl="triton")).to(device)
    triton_model.load_state_dict(reference_model.state_dict())
    idx = torch.randint(0, 101, (2, 19), device=device)
    targets = idx.roll(-1, dims=1)
    targets[0, -3:] = -100

    results = []
    for model in (reference_model, triton_model):
        logits = model.eval()(idx)[0]  # training hands back no logits: the fused backward overwrites them
        _, loss = model.train()(idx, targets)
        loss.backward()
        results.append((logits, loss, {n: p.grad for n, p in model.named_parameters()}))
    (logits_ref, loss_ref, grads_ref), (logits, loss, grads) = results
    assert rel_err(logits, logits_ref) < 1e-4
    assert abs(loss.item() - loss_ref.item()) < 1e-4 * loss_ref.item()
    for name, grad in grads.items():
        assert rel_err(grad, grads_ref[name]) < 1e-3, name


def test_importing_kernels_is_cheap_and_needs_no_triton():
    code = "import sys, ftlm.kernels; assert 'triton' not in sys.modules, 'triton imported eagerly'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
