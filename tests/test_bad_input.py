"""Bad input gets a clear error naming the problem, and the CLI shows it without a traceback."""

import subprocess
import sys

import numpy as np
import pytest

import gguf
from ingot.errors import ContextLengthError, FormatError, IngotError, UnsupportedError
from ingot.formats import open_checkpoint


def _write_gguf(path, arch="llama", tensor_type=gguf.GGMLQuantizationType.F32):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(32)
    if tensor_type == gguf.GGMLQuantizationType.F32:
        w.add_tensor("token_embd.weight", np.random.rand(8, 32).astype(np.float32))
    else:
        size, nbytes = gguf.GGML_QUANT_SIZES[tensor_type]
        raw = np.random.randint(0, 255, (8, 256 // size * nbytes), dtype=np.uint8)
        w.add_tensor("token_embd.weight", raw, raw_dtype=tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "ingot.cli", *args], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def test_truncated_gguf(tmp_path, smollm2_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm2_path.read_bytes()[: 20 * 2**20])
    with pytest.raises(FormatError, match="truncated"):
        open_checkpoint(cut)
    r = _cli("inspect", str(cut))
    assert r.returncode == 1 and "truncated" in r.stderr


def test_header_only_gguf(tmp_path, smollm2_path):
    cut = tmp_path / "head.gguf"
    cut.write_bytes(smollm2_path.read_bytes()[:1000])
    with pytest.raises(FormatError, match="truncated|corrupt"):
        open_checkpoint(cut)


def test_not_a_gguf(tmp_path):
    f = tmp_path / "notes.gguf"
    f.write_text("hello, I am not a model\n")
    with pytest.raises(FormatError, match="not a"):
        open_checkpoint(f)
    r = _cli("run", str(f), "-p", "hi")
    assert r.returncode == 1 and "not a" in r.stderr


def test_unknown_architecture(tmp_path):
    f = _write_gguf(tmp_path / "mamba.gguf", arch="mamba")
    with pytest.raises(UnsupportedError, match="unknown architecture 'mamba'.*gemma3.*llama.*qwen3"):
        open_checkpoint(f)
    r = _cli("inspect", str(f))
    assert r.returncode == 1 and "mamba" in r.stderr and "llama" in r.stderr


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.IQ4_NL, gguf.GGMLQuantizationType.TQ2_0])
def test_unsupported_quant_type(tmp_path, qtype):
    f = _write_gguf(tmp_path / "iq.gguf", tensor_type=qtype)
    with pytest.raises(UnsupportedError, match=f"token_embd.weight.*{qtype.name}"):
        open_checkpoint(f)


def test_missing_model_path(tmp_path):
    import ingot

    with pytest.raises(IngotError, match="no such file"):
        ingot.load(tmp_path / "nope.gguf")
    r = _cli("run", str(tmp_path / "nope.gguf"), "-p", "hi")
    assert r.returncode == 1 and "no such file" in r.stderr


def test_prompt_longer_than_context(smollm2):
    long_prompt = "word " * 600  # > 512 tokens of context
    with pytest.raises(ContextLengthError, match="context"):
        smollm2.generate(long_prompt, max_tokens=4)
    with pytest.raises(ContextLengthError):
        smollm2.generate_ids(list(range(10, 600)), max_tokens=4)


def test_prompt_longer_than_context_cli(smollm2_path):
    r = _cli("run", str(smollm2_path), "-c", "16", "-p", "word " * 40, "-n", "4")
    assert r.returncode == 1 and "context" in r.stderr


def test_bad_sampling_arguments(smollm2):
    with pytest.raises(IngotError, match="top_p"):
        smollm2.generate("Hi", max_tokens=2, temperature=1.0, top_p=1.5)
    with pytest.raises(IngotError, match="max_tokens"):
        smollm2.generate("Hi", max_tokens=-1)


@pytest.mark.parametrize("kwargs,message", [(dict(max_batch=0), "max_batch must be at least 1"),
                                            (dict(max_context=0), "max_context must be positive")])
def test_bad_load_sizes(smollm2_path, kwargs, message):
    import ingot

    with pytest.raises(IngotError, match=message):
        ingot.load(smollm2_path, device="cpu", **kwargs)
