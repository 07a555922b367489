"""Tensors on the wire: safetensors bytes with string metadata, checked before use.

``decode`` reads bytes from the network, so it parses and bounds-checks the safetensors
header itself and raises ``CodecError`` saying what is wrong before safetensors touches
the data. ``TensorSpec`` and ``validate`` check that a set of tensors has exactly the
names, shapes and dtypes another side expects, and holds no NaN or Inf.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

__all__ = [
    "CodecError",
    "TensorMismatchError",
    "TensorSpec",
    "MAX_HEADER_BYTES",
    "encode",
    "decode",
    "validate",
    "check_layout",
    "all_finite",
    "config_hash",
    "sha256_hex",
]

# Same limit as the safetensors library, so anything it writes can be read back here.
MAX_HEADER_BYTES = 100_000_000
_LENGTH_PREFIX_BYTES = 8
_METADATA_KEY = "__metadata__"

# safetensors dtype code -> numpy dtype (stored little-endian).
_MAX_DIMENSIONS = 32  # numpy allows 64
_MAX_DIMENSION_SIZE = 2**40

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_DTYPE_NAMES = {"float64", "float32", "float16", "int64", "int32", "int16", "int8",
                "uint64", "uint32", "uint16", "uint8", "bool"}  # fmt: skip
_NOT_IN_NUMPY = ("BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2")


class CodecError(ValueError):
    """Bytes that are not a well-formed, acceptable safetensors payload (or tensors that cannot become one)."""


class TensorMismatchError(ValueError):
    """Tensors that do not match the expected names, shapes or dtypes, or that hold NaN/Inf."""


# --------------------------------------------------------------------------- encode


def encode(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """Serialise numpy tensors and string metadata to safetensors bytes."""
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict of str to str, not {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(
                f"metadata entry {key!r}: {value!r} is not str -> str; "
                "convert values to strings (e.g. str(n), json.dumps(obj)) before encoding"
            )
    prepared: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
        if name == _METADATA_KEY:
            raise CodecError(f"{_METADATA_KEY!r} is reserved by safetensors; rename that tensor")
        if not isinstance(array, np.ndarray):
            raise TypeError(f"tensor {name!r} is a {type(array).__name__}, not a numpy array")
        if array.dtype.name not in _DTYPE_NAMES:
            raise CodecError(
                f"tensor {name!r} has dtype {array.dtype}, which the codec does not carry; "
                f"use one of {sorted(_DTYPE_NAMES)} (e.g. float32)"
            )
        # safetensors reads raw memory: it needs C-contiguous little-endian buffers.
        prepared[name] = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    try:
        return safetensors.numpy.save(prepared, metadata=dict(metadata))
    except Exception as error:  # safetensors raises its own error types; callers get one.
        raise CodecError(f"safetensors could not serialise the tensors: {error}") from error


# --------------------------------------------------------------------------- decode


def decode(data: bytes, *, max_bytes: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes into ``(tensors, metadata)``.

    The header is checked first: an 8-byte little-endian length within bounds, a JSON
    object, supported dtypes, shapes that match the byte ranges, and byte ranges that
    tile the data section exactly. ``max_bytes`` bounds the whole payload. The returned
    arrays are read-only views of one copy of the data; copy one before modifying it.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode needs bytes, got {type(data).__name__}")
    data = bytes(data)
    if max_bytes is not None and len(data) > max_bytes:
        raise CodecError(f"payload is {len(data)} bytes, over the limit of {max_bytes} bytes")
    header, metadata = _parse_header(data)
    if not header:
        return {}, metadata
    # Views straight into ``data``: the header was checked in full above (dtypes, shapes
    # that match their byte ranges, ranges that tile the data section), which is everything
    # safetensors' own loader would check again. Its second parse of the header cost the
    # hub as much as the rest of decoding a 64 KiB update.
    data_start = _LENGTH_PREFIX_BYTES + int.from_bytes(data[:_LENGTH_PREFIX_BYTES], "little")
    tensors: dict[str, np.ndarray] = {}
    for name, entry in header.items():
        dtype, shape = _DTYPES[entry["dtype"]], tuple(entry["shape"])
        count = math.prod(shape)
        array = (np.frombuffer(data, dtype=dtype, count=count, offset=data_start + entry["data_offsets"][0])
                 if count else np.empty(0, dtype=dtype))  # fmt: skip
        array = array.reshape(shape)
        array.flags.writeable = False
        tensors[name] = array
    return tensors, metadata


def _parse_header(data: bytes) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Validate the header; return its tensor entries (in header order) and its metadata."""
    if len(data) < _LENGTH_PREFIX_BYTES:
        raise CodecError(
            f"payload is {len(data)} bytes, too short for the 8-byte safetensors header length; "
            "it is truncated or not safetensors"
        )
    header_length = int.from_bytes(data[:_LENGTH_PREFIX_BYTES], "little")
    available = len(data) - _LENGTH_PREFIX_BYTES
    if header_length > MAX_HEADER_BYTES:
        raise CodecError(f"header length {header_length} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    if header_length > available:
        raise CodecError(
            f"header length {header_length} exceeds the {available} bytes after the length prefix; "
            "the payload is truncated or not safetensors"
        )
    raw_header = data[_LENGTH_PREFIX_BYTES : _LENGTH_PREFIX_BYTES + header_length]
    try:
        header = json.loads(
            raw_header.decode("utf-8"),
            object_pairs_hook=_refuse_duplicate_keys,
            parse_constant=_refuse_json_constant,
        )
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CodecError(f"header is not valid UTF-8 JSON ({error}); the payload is not safetensors") from error
    if not isinstance(header, dict):
        raise CodecError(f"header is a JSON {type(header).__name__}, expected an object")

    metadata = _parse_metadata(header.pop(_METADATA_KEY, {}))
    data_length = available - header_length
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        begin, end = _check_entry(name, entry, data_length)
        ranges.append((begin, end, name))
    _check_ranges_tile(ranges, data_length)
    return header, metadata


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):  # the common case costs one dict, not a loop in Python
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise CodecError(f"header has the key {key!r} twice")
            seen.add(key)
    return result


def _refuse_json_constant(constant: str) -> Any:
    raise CodecError(f"header contains the non-JSON constant {constant}")


def _parse_metadata(metadata: Any) -> dict[str, str]:
    if not isinstance(metadata, dict):
        raise CodecError(f"header {_METADATA_KEY!r} is a JSON {type(metadata).__name__}, expected an object")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise CodecError(f"metadata value for {key!r} is {value!r}; safetensors metadata values must be strings")
    return metadata


def _is_count(value: Any) -> bool:
    # bool is an int subclass; `true` is not a valid dimension or offset.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entry(name: str, entry: Any, data_length: int) -> tuple[int, int]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CodecError(
            f"header entry for tensor {name!r} must be an object with exactly dtype, shape and data_offsets"
        )
    dtype_code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype_code in _NOT_IN_NUMPY:
        raise CodecError(
            f"tensor {name!r} has dtype {dtype_code}, which numpy cannot represent; "
            "convert it to float32 (or float16) before encoding"
        )
    if dtype_code not in _DTYPES:
        raise CodecError(f"tensor {name!r} has unsupported dtype {dtype_code!r}; supported: {sorted(_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
        raise CodecError(f"tensor {name!r} has shape {shape!r}; expected a list of non-negative integers")
    # The byte-size check below cannot bound an empty tensor's other dimensions, and numpy
    # refuses shapes beyond these limits with a plain ValueError (a hub error, not a refusal).
    if len(shape) > _MAX_DIMENSIONS or any(dim > _MAX_DIMENSION_SIZE for dim in shape):
        raise CodecError(f"tensor {name!r} has shape {shape[:8]!r}{'...' if len(shape) > 8 else ''} of "
                         f"{len(shape)} dimensions; at most {_MAX_DIMENSIONS}, each at most "
                         f"{_MAX_DIMENSION_SIZE}")  # fmt: skip
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise CodecError(
            f"tensor {name!r} has data_offsets {offsets!r}; expected [begin, end] with non-negative integers"
        )
    begin, end = offsets
    if not begin <= end <= data_length:
        raise CodecError(
            f"tensor {name!r} has data_offsets [{begin}, {end}] outside the {data_length}-byte data section"
        )
    expected_bytes = math.prod(shape) * _DTYPES[dtype_code].itemsize
    if end - begin != expected_bytes:
        raise CodecError(
            f"tensor {name!r} spans {end - begin} bytes but shape {shape} of {dtype_code} needs {expected_bytes}"
        )
    return begin, end


def _check_ranges_tile(ranges: list[tuple[int, int, str]], data_length: int) -> None:
    """Byte ranges must cover the data section exactly: no gaps, no overlaps, no trailing bytes."""
    position = 0
    for begin, end, name in sorted(ranges):
        if begin != position:
            problem = "overlaps the previous tensor" if begin < position else f"leaves a gap at byte {position}"
            raise CodecError(f"tensor {name!r} starts at byte {begin} and {problem}")
        position = end
    if position != data_length:
        raise CodecError(f"data section has {data_length - position} trailing bytes that belong to no tensor")


# --------------------------------------------------------------------------- specs


class TensorSpec(Mapping[str, tuple[tuple[int, ...], str]]):
    """The expected tensors: name -> (shape, numpy dtype name), in a fixed order.

    >>> spec = TensorSpec.of({"w": np.zeros((2, 3), np.float32)})
    >>> spec["w"]
    ((2, 3), 'float32')
    """

    def __init__(self, entries: Mapping[str, tuple[tuple[int, ...], str]]) -> None:
        self._entries: dict[str, tuple[tuple[int, ...], str]] = {}
        for name, (shape, dtype) in entries.items():
            self._entries[str(name)] = (tuple(int(dim) for dim in shape), np.dtype(dtype).name)

    @classmethod
    def of(cls, tensors: Mapping[str, np.ndarray]) -> TensorSpec:
        return cls({name: (array.shape, array.dtype.name) for name, array in tensors.items()})

    def to_json(self) -> str:
        entries = {name: {"shape": list(shape), "dtype": dtype} for name, (shape, dtype) in self._entries.items()}
        return json.dumps(entries, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> TensorSpec:
        try:
            raw = json.loads(text)
            return cls({name: (entry["shape"], entry["dtype"]) for name, entry in raw.items()})
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"not a TensorSpec JSON ({error!r}); expected {{name: {{'shape': [...], 'dtype': '...'}}}}"
            ) from error

    def __getitem__(self, name: str) -> tuple[tuple[int, ...], str]:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"TensorSpec({self._entries!r})"


def all_finite(array: np.ndarray) -> bool:
    """True if a floating array holds no NaN or Inf; integer and bool arrays always pass.

    Fast path: a sum of finite values is finite unless it overflows, and NaN/Inf always
    propagate, so one reduction (no temporary array) settles the common case. Only a
    non-finite sum pays for the exact element-wise test.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # overflow just sends us to the exact path
        return _finite_in_errstate(array)


def first_non_finite(tensors: Mapping[str, np.ndarray]) -> str | None:
    """The name of the first tensor holding NaN or Inf, or None: ``all_finite`` of each, with
    one ``errstate`` for all (entering it costs as much as a small tensor's sum)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return next((name for name, array in tensors.items() if not _finite_in_errstate(array)), None)


def _finite_in_errstate(array: np.ndarray) -> bool:
    """``all_finite``'s test; the caller holds ``np.errstate(over="ignore", invalid="ignore")``."""
    if array.dtype.kind != "f":  # integer, bool (and complex, which decode never makes) pass
        return True
    accumulator = np.float64 if array.dtype.itemsize > 4 else np.float32
    if math.isfinite(float(np.add.reduce(array, axis=None, dtype=accumulator))):
        return True
    return bool(np.isfinite(array).all())


def validate(tensors: Mapping[str, np.ndarray], spec: Mapping[str, tuple[tuple[int, ...], str]], *,
             what: str = "update") -> None:  # fmt: skip
    """Raise TensorMismatchError naming the first tensor that is missing, unexpected, of the
    wrong shape or dtype, or holding NaN/Inf. ``what`` names the tensors in the message."""
    for name, array in tensors.items():
        if not isinstance(array, np.ndarray):
            raise TensorMismatchError(f"{what} tensor {name!r} is a {type(array).__name__}, not a numpy array")
    check_layout(TensorSpec.of(tensors), spec, what=what)
    for name, array in tensors.items():
        if not all_finite(array):
            raise TensorMismatchError(
                f"{what} tensor {name!r} contains NaN or Inf; it is refused (did training diverge?)"
            )


def check_layout(actual: Mapping[str, tuple[tuple[int, ...], str]], expected: Mapping[str, tuple[tuple[int, ...], str]],
                 *, what: str = "update") -> None:  # fmt: skip
    """Raise TensorMismatchError naming the first tensor of ``expected`` that ``actual`` lacks or
    has with another shape or dtype, or the first tensor ``actual`` has in excess."""
    for name, (shape, dtype) in expected.items():
        if name not in actual:
            raise TensorMismatchError(
                f"{what} lacks tensor {name!r} (expected shape {tuple(shape)}, dtype {dtype})"
            )
        actual_shape, actual_dtype = actual[name]
        if tuple(actual_shape) != tuple(shape):
            raise TensorMismatchError(f"{what} tensor {name!r} has shape {tuple(actual_shape)}, expected {tuple(shape)}")
        if np.dtype(actual_dtype).name != np.dtype(dtype).name:
            raise TensorMismatchError(f"{what} tensor {name!r} has dtype {np.dtype(actual_dtype).name}, expected {dtype}")
    for name in actual:
        if name not in expected:
            raise TensorMismatchError(f"{what} has unexpected tensor {name!r}, which is not in the expected spec")


# --------------------------------------------------------------------------- hashing


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _to_json_value(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(
        f"config_hash needs JSON-compatible values (dict, list, str, number, bool, None, dataclass, set); "
        f"got {type(value).__name__}: {value!r}"
    )


def config_hash(obj: Any) -> str:
    """SHA-256 hex of ``obj`` as canonical JSON (sorted keys, no whitespace, UTF-8).

    Both sides hash the same configuration to check they agree; tuples hash like lists,
    dataclasses like their ``asdict``, sets like sorted lists. NaN and Inf are refused.
    """
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False, default=_to_json_value)  # fmt: skip
    except ValueError as error:
        raise ValueError(f"config_hash cannot hash {obj!r}: {error}") from error
    return sha256_hex(text.encode("utf-8"))
