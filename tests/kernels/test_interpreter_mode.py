"""Outside the test process's interpreter mode: CPU tensors without TRITON_INTERPRET=1 are a clear error."""

import json
import os
import subprocess
import sys
from pathlib import Path

CODE = """
import json, os, torch
from ftlm import kernels

def error(call):
    try:
        call()
    except RuntimeError as e:
        return str(e)
    return None

x = torch.randn(1, 2, 8, 32)
out = {
    "attention": error(lambda: kernels.flash_attention(x, x, x)),
    "rms_norm": error(lambda: kernels.rms_norm(x, torch.ones(32))),
}
os.environ["TRITON_INTERPRET"] = "1"  # too late: the kernels were defined compiled
out["late"] = error(lambda: kernels.layer_norm(x, torch.ones(32), None))
print(json.dumps(out))
"""


def test_cpu_without_the_interpreter_is_a_clear_error():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    for op in ("attention", "rms_norm"):
        assert errors[op] and "TRITON_INTERPRET=1" in errors[op] and "attn_impl=sdpa" in errors[op], errors
        assert "too late" not in errors[op]
    assert errors["late"] and "before triton is first imported (it was set too late)" in errors["late"], errors
