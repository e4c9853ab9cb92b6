"""Our GGUF header parser agrees with gguf-py's reader on every value type, tensor type and alignment."""

import numpy as np
import pytest

import gguf
from ingot.formats.gguf import GGUFFile


def _compare(path):
    ours = GGUFFile(path)
    ref = gguf.GGUFReader(path)
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        want = field.contents()
        got = ours.metadata[key]
        if isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-7), key
        else:
            assert got == want, key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for mine, theirs in zip(ours.tensors, ref.tensors):
        assert mine.qtype == theirs.tensor_type.name
        assert mine.shape == tuple(int(d) for d in reversed(theirs.shape.tolist()))
        assert np.array_equal(ours.tensor_data(mine), theirs.data.reshape(-1).view(np.uint8)), mine.name


@pytest.mark.parametrize("alignment", [32, 64])
def test_written_file(tmp_path, alignment):
    rng = np.random.default_rng()
    path = tmp_path / "all.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment != 32:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓ 世界")
    w.add_array("t.ints", [1, 2, 3, 40000])
    w.add_array("t.strs", ["a", "", "ß", "<|im_end|>"])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.bools", [True, False, True])
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((4, 8)).astype(np.float16))
    raw = rng.integers(0, 255, (2, 2 * 34), dtype=np.uint8)
    w.add_tensor("q8", raw, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _compare(path)


def test_real_file(smollm2_path):
    _compare(smollm2_path)
