import json
import struct
from dataclasses import dataclass

import numpy as np
import pytest

from fedvlm.shared.tensor_codec import (
    MAX_HEADER_BYTES,
    CodecError,
    TensorMismatchError,
    TensorSpec,
    all_finite,
    config_hash,
    decode,
    encode,
    sha256_hex,
    validate,
)


def sample_tensors():
    rng = np.random.default_rng(0)
    return {
        "layer.lora_B.weight": rng.standard_normal((6, 4)).astype(np.float32),
        "half": rng.standard_normal(3).astype(np.float16),
        "double": rng.standard_normal((2, 2, 2)),
        "steps": np.arange(5, dtype=np.int64),
        "empty": np.zeros((0, 3), np.float32),
    }


def raw_payload(header: dict, data: bytes = b"") -> bytes:
    header_bytes = json.dumps(header).encode()
    return struct.pack("<Q", len(header_bytes)) + header_bytes + data


def test_round_trip_keeps_values_dtypes_order_and_metadata():
    tensors = sample_tensors()
    tensors["strided"] = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]  # not contiguous
    tensors["big_endian"] = np.arange(3, dtype=">f4")
    decoded, metadata = decode(encode(tensors, {"round": "3", "client": "c1"}))
    assert metadata == {"round": "3", "client": "c1"}
    assert set(decoded) == set(tensors)
    for name, array in tensors.items():
        assert decoded[name].dtype.name == array.dtype.name, name
        np.testing.assert_array_equal(decoded[name], array)


def test_empty_payload_round_trips():
    assert decode(encode({}, {"k": "v"})) == ({}, {"k": "v"})


def test_encode_refuses_non_string_metadata_and_unsupported_dtypes():
    with pytest.raises(TypeError, match="'round'"):
        encode({}, {"round": 3})
    with pytest.raises(CodecError, match="complex"):
        encode({"z": np.zeros(2, np.complex64)}, {})
    with pytest.raises(TypeError, match="not a numpy array"):
        encode({"x": [1.0]}, {})


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "too short"),
        (b"\x01\x02\x03", "too short"),
        (b"garbage that is not safetensors at all", "exceeds"),
        (struct.pack("<Q", 2**60) + b"{}", "exceeds the limit"),
        (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", "exceeds the limit"),
        (struct.pack("<Q", 100) + b"{}", "truncated"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "UTF-8 JSON"),
        (struct.pack("<Q", 5) + b"{bad}", "UTF-8 JSON"),
        (struct.pack("<Q", 2) + b"[]", "expected an object"),
    ],
)
def test_malformed_bytes_raise_codec_error(payload, message):
    with pytest.raises(CodecError, match=message):
        decode(payload)


def test_truncated_payload_raises_codec_error():
    payload = encode(sample_tensors(), {})
    for cut in (len(payload) - 1, len(payload) // 2, 9):
        with pytest.raises(CodecError):
            decode(payload[:cut])


@pytest.mark.parametrize(
    ("entry", "data", "message"),
    [
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}, b"\0" * 8, "outside"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}, b"\0" * 12, "gap"),
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, b"\0" * 8, "needs 12"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, b"\0" * 8, "outside"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, b"\0" * 8, "shape"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0]}, b"\0" * 8, "data_offsets"),
        ({"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}, b"\0" * 4, "BF16.*float32"),
        ({"dtype": "Q4", "shape": [2], "data_offsets": [0, 4]}, b"\0" * 4, "unsupported dtype"),
        ({"dtype": "F32", "shape": [2]}, b"\0" * 8, "exactly dtype, shape and data_offsets"),
        # Shapes numpy cannot make (a plain ValueError would be a hub error, not a refusal).
        ({"dtype": "F32", "shape": [1] * 70, "data_offsets": [0, 4]}, b"\0" * 4, "70 dimensions"),
        ({"dtype": "F32", "shape": [0] * 70, "data_offsets": [0, 0]}, b"", "70 dimensions"),
        ({"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}, b"", "each at most"),
    ],
)
def test_bad_header_entries_name_the_tensor(entry, data, message):
    with pytest.raises(CodecError, match=message) as caught:
        decode(raw_payload({"w": entry}, data))
    assert "'w'" in str(caught.value)


def test_trailing_bytes_are_refused():
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    decode(raw_payload({"w": entry}, b"\0" * 8))
    with pytest.raises(CodecError, match="1 trailing bytes"):
        decode(raw_payload({"w": entry}, b"\0" * 9))


def test_overlapping_tensors_are_refused():
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    with pytest.raises(CodecError, match="overlaps"):
        decode(raw_payload(header, b"\0" * 12))


def test_bad_metadata_and_duplicate_keys_are_refused():
    with pytest.raises(CodecError, match="must be strings"):
        decode(raw_payload({"__metadata__": {"round": 3}}))
    duplicated = b'{"__metadata__":{},"__metadata__":{}}'
    with pytest.raises(CodecError, match="twice"):
        decode(struct.pack("<Q", len(duplicated)) + duplicated)


def test_max_bytes_bounds_the_payload():
    payload = encode(sample_tensors(), {})
    decode(payload, max_bytes=len(payload))
    with pytest.raises(CodecError, match="over the limit"):
        decode(payload, max_bytes=len(payload) - 1)


def test_tensor_spec_of_and_json_round_trip():
    tensors = sample_tensors()
    spec = TensorSpec.of(tensors)
    assert spec["layer.lora_B.weight"] == ((6, 4), "float32")
    assert list(spec) == list(tensors)
    assert TensorSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="TensorSpec JSON"):
        TensorSpec.from_json('{"w": {"shape": [2]}}')


def test_validate_accepts_matching_tensors():
    tensors = sample_tensors()
    validate(tensors, TensorSpec.of(tensors))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop("half"), "global state lacks tensor 'half'"),
        (lambda t: t.update(extra=np.zeros(1, np.float32)), "unexpected tensor 'extra'"),
        (lambda t: t.update(double=np.zeros((2, 2))), r"'double' has shape \(2, 2\), expected \(2, 2, 2\)"),
        (lambda t: t.update(half=t["half"].astype(np.float32)), "'half' has dtype float32, expected float16"),
        (lambda t: t["layer.lora_B.weight"].__setitem__((1, 2), np.nan), "'layer.lora_B.weight' contains NaN"),
        (lambda t: t["double"].__setitem__((0, 0, 0), -np.inf), "'double' contains NaN or Inf"),
    ],
)
def test_validate_names_the_first_mismatching_tensor(change, message):
    tensors = sample_tensors()
    spec = TensorSpec.of(tensors)
    change(tensors)
    with pytest.raises(TensorMismatchError, match=message):
        validate(tensors, spec, what="global state")


def test_all_finite_is_exact_even_when_the_sum_overflows():
    huge = np.full(10, 3e38, np.float32)  # finite values whose float32 sum overflows
    assert all_finite(huge)
    huge[3] = np.inf
    assert not all_finite(huge)
    assert all_finite(np.array([1, 2], np.int32))


def test_config_hash_is_canonical():
    @dataclass
    class Config:
        r: int
        targets: tuple

    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": (1, 2), "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    assert config_hash(Config(8, ("q", "v"))) == config_hash({"r": 8, "targets": ["q", "v"]})
    assert config_hash({"x": 1}) == sha256_hex(b'{"x":1}')
    with pytest.raises(ValueError):
        config_hash({"x": float("nan")})
    with pytest.raises(TypeError, match="JSON-compatible"):
        config_hash({"x": object()})
