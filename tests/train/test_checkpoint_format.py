"""The shared checkpoint format's small pieces: the architecture keys, devices, atomic writes, checksum ownership."""

from __future__ import annotations

import dataclasses
import errno
import json
import os

import pytest
import torch

from ftlm.checkpoint import ARCH_KEYS, RUNTIME_KEYS, resolve_device, write_atomic, write_json_atomic
from ftlm.checkpoint.atomic import is_disk_full
from ftlm.checkpoint.format import owner_rank
from ftlm.model import GPTConfig


def test_arch_keys_are_config_fields_and_exclude_runtime_choices():
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    assert set(ARCH_KEYS) <= fields and len(set(ARCH_KEYS)) == len(ARCH_KEYS)
    assert {"norm_eps", "parallel_residual", "rotary_pct", "gelu_approx"} <= set(ARCH_KEYS)
    assert not set(RUNTIME_KEYS) & set(ARCH_KEYS)
    assert not {"dropout", "init_std", "name", "doc_mask", "new_token_init"} & set(ARCH_KEYS)


def test_resolve_device_names_the_option(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(
        ValueError, match=r"^--device=cuda:1: no CUDA GPU is visible; use --device=auto or --device=cpu"
    ):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match=r"^trainer.device=cuda: no CUDA GPU is visible; use trainer.device=auto"):
        resolve_device("cuda", option="trainer.device")
    with pytest.raises(ValueError, match=r"^trainer.device=gpu: not one of auto, cpu, cuda, cuda:N"):
        resolve_device("gpu", option="trainer.device")


def test_atomic_writes_leave_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    write_json_atomic(target, {"한국어": 1})
    assert target.read_text(encoding="utf-8") == '{\n  "한국어": 1\n}\n'
    write_atomic(target, b"bytes too")
    assert target.read_bytes() == b"bytes too"

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as e:
        write_atomic(target, "new text")
    assert is_disk_full(e.value)
    assert target.read_bytes() == b"bytes too" and os.listdir(tmp_path) == ["state.json"]  # no temporary left


def test_disk_full_is_recognised_through_wrapping_errors():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from inner
    except RuntimeError as e:
        assert is_disk_full(e)
    assert not is_disk_full(RuntimeError("something else"))
    assert is_disk_full(RuntimeError("PytorchStreamWriter failed writing file: No space left on device"))


@pytest.mark.parametrize(
    "name, world, owner",
    [
        ("zero_pp_rank_3_mp_rank_00_optim_states.pt", 4, 3),
        ("bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", 2, 1),
        ("zero_pp_rank_5_mp_rank_00_model_states.pt", 4, 1),  # resumed on fewer ranks: still spread out
        ("rank2_state.pt", 4, 2),
        ("mp_rank_00_model_states.pt", 4, 0),
        ("trainer_state.json", 4, 0),
        ("zero/embed.weight/fp32.pt", 4, 0),
    ],
)
def test_each_rank_checksums_the_files_it_wrote(name, world, owner):
    assert owner_rank(name, world) == owner


def test_manifest_lists_sizes_and_checksums(tmp_path):
    from ftlm.checkpoint.format import file_checksum, write_manifest

    (tmp_path / "a.pt").write_bytes(b"a" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.pt").write_bytes(b"b" * 7)
    write_manifest(tmp_path, checksums={"a.pt": file_checksum(tmp_path / "a.pt")}, step=3)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["step"] == 3 and m["files"] == {"a.pt": 100, "sub/b.pt": 7}
    assert m["checksums"] == {
        "a.pt": file_checksum(tmp_path / "a.pt"),
        "sub/b.pt": file_checksum(tmp_path / "sub/b.pt"),
    }
