"""GGUFFile reads what gguf's own GGUFReader reads: every field, every tensor's type, shape and
bytes, on the default model's file and on a file with every value type and a custom alignment."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from lmforge.config import ModelConfig
from lmforge.errors import ModelLoadError
from lmforge.models.gguf_file import GGUFFile
from lmforge.models.loader import load_model


def assert_same_as_gguf_reader(path):
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.fields == expected
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.tensor_type == b.tensor_type, a.name
        assert a.shape == tuple(int(d) for d in b.shape), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data, b.data), a.name


def test_the_default_models_file_reads_as_gguf_reads_it(smollm2_gguf_path):
    assert_same_as_gguf_reader(smollm2_gguf_path)


@pytest.fixture
def every_type_gguf(tmp_path):
    path = tmp_path / "types.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_custom_alignment(64)
    writer.add_uint8("t.u8", 7)
    writer.add_int8("t.i8", -7)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 0.25)
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float64("t.f64", 1e-300)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo ▁world")
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, 1.5])
    writer.add_array("t.strs", ["a", "", "ü"])
    rng = np.random.default_rng(0)
    writer.add_tensor("f32", rng.standard_normal((3, 64), dtype=np.float32))
    writer.add_tensor("f16", rng.standard_normal((2, 32)).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((4, 64), dtype=np.float32),
                              gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("q8", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_every_value_type_and_a_custom_alignment(every_type_gguf):
    assert_same_as_gguf_reader(every_type_gguf)
    fields = GGUFFile(every_type_gguf).fields
    assert fields["t.strs"] == ["a", "", "ü"] and fields["t.u64"] == 2**63 + 5
    assert fields["general.alignment"] == 64


def test_a_truncated_or_foreign_file_is_a_clear_error(every_type_gguf, tmp_path):
    data = every_type_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:len(data) - 100])  # inside the last tensor (48 bytes of padding follow it)
    with pytest.raises(ValueError, match="ends inside tensor q8"):
        GGUFFile(cut)
    cut.write_bytes(data[:100])  # inside the metadata
    with pytest.raises(ValueError, match="ends inside its header"):
        GGUFFile(cut)
    foreign = tmp_path / "model.gguf"
    foreign.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(foreign)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(ModelConfig(model=str(foreign)))
