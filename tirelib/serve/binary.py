"""The Open Inference Protocol's binary tensor data extension, as Triton defines it and NVIDIA's
``tritonclient`` uses it by default.

A request with an ``Inference-Header-Content-Length`` header holds that many bytes of JSON, then
the raw bytes of every input whose ``parameters`` carry ``binary_data_size``, one after the
other in the order of the inputs: fixed-size datatypes row-major and little-endian, BYTES as each
element's length (4 bytes, little-endian) followed by the element. An answer does the same for
the outputs requested with ``parameters: {"binary_data": true}`` (all of them when the request's
``parameters`` say ``binary_data_output: true``): the JSON gives each one's ``binary_data_size``
instead of ``data``, and the answer's ``Inference-Header-Content-Length`` says where the JSON
ends. A request sends its images as FP32 (or FP16, FP64) ``[N, H, W, 3]`` in [0, 1], UINT8
``[N, H, W, 3]`` in [0, 255], or BYTES ``[N]`` of encoded images; every size is checked against
the others before any pixel is read, and a mismatch is a :class:`~tirelib.errors.DataError`
naming the input and both sizes.
"""

from __future__ import annotations

import functools
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from tirelib.errors import DataError
from tirelib.serve.inputs import Limits, Located, _check_sides, check_count, from_v2_tensor
from tirelib.serve.limits import excerpt
from tirelib.serve.schemas import V2InferRequest, V2Tensor

HEADER = "Inference-Header-Content-Length"
"""The header naming the length of the JSON part of a body, in requests and answers."""
SIZE = "binary_data_size"
"""The tensor parameter giving the length of its binary data."""
BINARY_MEDIA_TYPE = "application/octet-stream"
"""The answer's media type when it carries binary data (Triton's)."""
FIXED_TYPES: dict[str, type[np.generic]] = {
    "FP32": np.float32,
    "FP16": np.float16,
    "FP64": np.float64,
    "UINT8": np.uint8,
}
"""The fixed-size datatypes (an image batch ``[N, H, W, 3]``, the probabilities) as numpy's."""
_UNSUPPORTED = {
    "shared_memory_region": "shared memory is not supported; send the data in the body",
    "classification": "classification outputs are not supported; request 'probabilities'",
}
_DIGITS = re.compile(r"[0-9]{1,20}")
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class Body:
    """A request body split where its JSON ends; ``binary`` is None without the header."""

    json: bytes
    binary: memoryview | None = None


def split_body(raw: bytes, header_length: str | None) -> Body:
    """``raw`` as JSON and binary data, at ``header_length`` (the header's value, if sent)."""
    if header_length is None:
        return Body(raw)
    if not _DIGITS.fullmatch(header_length):
        raise DataError(
            f"the {HEADER} header must be the length of the body's JSON part in bytes, "
            f"a positive integer, got {excerpt(header_length, 40)}"
        )
    length = int(header_length)
    if length == 0:
        raise DataError(f"the {HEADER} header is 0: the body must start with its JSON part")
    if length > len(raw):
        raise DataError(
            f"the {HEADER} header says the JSON part holds {length:,} bytes, "
            f"but the body holds only {len(raw):,}"
        )
    return Body(raw[:length], memoryview(raw)[length:])


def _refuse_unsupported(parameters: dict[str, Any], where: str) -> None:
    for name, why in _UNSUPPORTED.items():
        if name in parameters:
            raise DataError(f"{where}: {why}")


def input_chunks(tensors: Sequence[V2Tensor], binary: memoryview | None) -> list[memoryview | None]:
    """Each input's binary data, None for one whose data is in the JSON.

    The inputs' ``binary_data_size`` must add up to the bytes after the JSON, exactly.
    """
    chunks: list[memoryview | None] = []
    offset = 0
    for tensor in tensors:
        where = f"input {excerpt(tensor.name, 40)}"
        parameters = tensor.parameters or {}
        _refuse_unsupported(parameters, where)
        size = parameters.get(SIZE)
        if size is None:
            if tensor.data is None:
                raise DataError(
                    f'{where}: no data; send "data" in the JSON, or the tensor\'s bytes after '
                    f"the JSON with parameters.{SIZE} and the {HEADER} header"
                )
            chunks.append(None)
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise DataError(
                f"{where}: parameters.{SIZE} must be a non-negative integer, got {excerpt(size)}"
            )
        if tensor.data is not None:
            raise DataError(f'{where}: both "data" and parameters.{SIZE} are given; send one')
        if binary is None:
            raise DataError(
                f"{where}: parameters.{SIZE} is {size:,}, but the request has no {HEADER} "
                "header saying where its JSON part ends and the binary data begins"
            )
        left = len(binary) - offset
        if size > left:
            raise DataError(
                f"{where}: parameters.{SIZE} is {size:,} bytes, but only {left:,} bytes of "
                "binary data follow the JSON part" + (" and the inputs before it" if offset else "")
            )
        chunks.append(binary[offset : offset + size])
        offset += size
    if binary is not None and offset != len(binary):
        raise DataError(
            f"the body holds {len(binary):,} bytes after its JSON part, but the inputs' "
            f"parameters.{SIZE} add up to {offset:,}"
        )
    return chunks


# --------------------------------------------------------------------------- inputs


def images_of(batch: np.ndarray, where: str) -> list[Located]:
    """An ``[N, H, W, C]`` batch as float32 HWC images in [0, 1], named by index.

    UINT8 pixels are divided by 255, as an encoded image's are; the others are copied into
    float32 (a writable array in the machine's byte order). Ranges and finiteness are checked
    with the rest of the request's images, when they are preprocessed.
    """
    pixels = batch.astype(np.float32)
    if batch.dtype == np.uint8:
        np.divide(pixels, 255.0, out=pixels)
    return [(f"{where}[{i}]", pixels[i]) for i in range(len(pixels))]


def _check_image_shape(where: str, datatype: str, shape: Sequence[int], limits: Limits) -> None:
    if len(shape) != 4:
        raise DataError(
            f"{where}: {datatype} input must have shape [N, H, W, 3], got {list(shape)}"
        )
    check_count(shape[0], limits, where)
    try:
        _check_sides(shape[1], shape[2], limits)
    except DataError as error:
        raise DataError(f"{where}: {error}") from error


def _check_bytes_shape(where: str, shape: Sequence[int], limits: Limits) -> None:
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise DataError(
            f"{where}: BYTES input must have shape [N] (one encoded image each), got {list(shape)}"
        )
    check_count(shape[0], limits, where)


def split_bytes(data: memoryview, count: int, where: str) -> list[bytes]:
    """A BYTES tensor's binary form: ``count`` elements, each its 4-byte length, then itself."""
    items = []
    offset = 0
    for index in range(count):
        if len(data) - offset < _LENGTH.size:
            raise DataError(
                f"{where}: the binary data ends before element {index} of {count}; each element "
                "is its length (4 bytes, little-endian) followed by its bytes"
            )
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        if length > len(data) - offset:
            raise DataError(
                f"{where}: element {index} declares {length:,} bytes, but only "
                f"{len(data) - offset:,} bytes of the input's binary data remain"
            )
        items.append(bytes(data[offset : offset + length]))
        offset += length
    if offset != len(data):
        raise DataError(
            f"{where}: {len(data) - offset:,} bytes are left after the {count} elements the "
            f"shape names; parameters.{SIZE} must cover exactly the elements"
        )
    return items


def from_binary_tensor(tensor: V2Tensor, data: memoryview, limits: Limits) -> list[Located]:
    """The images of an input sent as binary data (``data``: its bytes after the JSON)."""
    where = f"input {excerpt(tensor.name, 40)}"
    shape = tensor.shape
    if tensor.datatype == "BYTES":
        _check_bytes_shape(where, shape, limits)
        items = split_bytes(data, shape[0], where)
        return [(f"{where}[{i}]", item) for i, item in enumerate(items)]
    _check_image_shape(where, tensor.datatype, shape, limits)
    dtype = np.dtype(FIXED_TYPES[tensor.datatype]).newbyteorder("<")
    values = math.prod(shape)
    if values * dtype.itemsize != len(data):
        raise DataError(
            f"{where}: shape {list(shape)} of {tensor.datatype} needs {values * dtype.itemsize:,} "
            f"bytes ({values:,} values of {dtype.itemsize}), but parameters.{SIZE} is "
            f"{len(data):,}"
        )
    return images_of(np.frombuffer(data, dtype=dtype).reshape(shape), where)


@functools.cache
def _nested_ints(depth: int) -> Any:
    kind: Any = int
    for _ in range(depth):
        kind = list[kind]
    return kind


def from_json_uint8(tensor: V2Tensor, limits: Limits) -> list[Located]:
    """A UINT8 input whose ``data`` is in the JSON: integers in [0, 255], flat or nested."""
    where = f"input {excerpt(tensor.name, 40)}"
    shape = tensor.shape
    _check_image_shape(where, "UINT8", shape, limits)
    depth, probe = 0, tensor.data
    while isinstance(probe, list):
        depth += 1
        probe = probe[0] if probe else None
    hint = "UINT8 data must be integers in [0, 255] (8-bit pixels)"
    try:
        msgspec.convert(tensor.data, _nested_ints(depth), strict=True)
        array = np.asarray(tensor.data, dtype=np.int64)
    except msgspec.ValidationError as error:
        raise DataError(f"{where}: {hint}: {str(error).replace('`$', '`')}") from error
    except (TypeError, ValueError, OverflowError) as error:
        raise DataError(f"{where}: {hint}, ragged lists are not allowed ({error})") from error
    values = math.prod(shape)
    if array.size != values:
        raise DataError(
            f"{where}: shape {list(shape)} needs {values} values, the data holds {array.size}"
        )
    if array.size and (int(array.min()) < 0 or int(array.max()) > 255):
        raise DataError(f"{where}: {hint}, got the range [{int(array.min())}, {int(array.max())}]")
    return images_of(array.astype(np.uint8).reshape(shape), where)


def input_images(tensor: V2Tensor, chunk: memoryview | None, limits: Limits) -> list[Located]:
    """The images of one input: from its binary data (``chunk``) or from its JSON data."""
    if chunk is not None:
        return from_binary_tensor(tensor, chunk, limits)
    if tensor.datatype == "UINT8":
        return from_json_uint8(tensor, limits)
    return from_v2_tensor(
        name=tensor.name,
        datatype=tensor.datatype,
        shape=tensor.shape,
        data=tensor.data,
        limits=limits,
    )


# --------------------------------------------------------------------------- outputs


def _flag(parameters: dict[str, Any] | None, name: str, where: str, default: bool) -> bool:
    value = (parameters or {}).get(name, default)
    if not isinstance(value, bool):
        raise DataError(f"{where}: parameters.{name} must be true or false, got {excerpt(value)}")
    return value


def requested_outputs(body: V2InferRequest, available: Sequence[str]) -> list[tuple[str, bool]]:
    """The outputs to answer, in order, each with whether it goes as binary data.

    Without ``outputs`` every output is answered; the request's ``binary_data_output`` is the
    default of each one's ``binary_data``.
    """
    default = _flag(body.parameters, "binary_data_output", "the request", False)
    if body.outputs is None:
        return [(name, default) for name in available]
    unknown = sorted({o.name for o in body.outputs} - set(available))
    if unknown:
        named = ", ".join(excerpt(name, 40) for name in unknown[:5])
        raise DataError(f"unknown outputs [{named}]; this model gives {list(available)}")
    chosen = []
    seen: set[str] = set()
    for output in body.outputs:
        where = f"output {output.name!r}"
        if output.name in seen:
            raise DataError(f"{where} is requested twice; name each output once")
        seen.add(output.name)
        _refuse_unsupported(output.parameters or {}, where)
        chosen.append((output.name, _flag(output.parameters, "binary_data", where, default)))
    return chosen


def serialize_bytes(items: Sequence[bytes]) -> bytes:
    """A BYTES tensor's binary form: each element's 4-byte length, then the element."""
    return b"".join(_LENGTH.pack(len(item)) + item for item in items)


def output_tensor(
    name: str, datatype: str, shape: list[int], values: np.ndarray | list[str], binary: bool
) -> tuple[dict[str, Any], bytes | None]:
    """An output's JSON (with ``data``, or ``binary_data_size``) and its binary data, if any."""
    tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    if not binary:
        tensor["data"] = values.ravel().tolist() if isinstance(values, np.ndarray) else values
        return tensor, None
    if isinstance(values, np.ndarray):
        raw = np.ascontiguousarray(values, dtype=np.dtype(FIXED_TYPES[datatype]).newbyteorder("<"))
        data = raw.tobytes()
    else:
        data = serialize_bytes([value.encode() for value in values])
    tensor["parameters"] = {SIZE: len(data)}
    return tensor, data


def encode_answer(
    answer: dict[str, Any], outputs: Sequence[tuple[dict[str, Any], bytes | None]]
) -> tuple[bytes, dict[str, str], str]:
    """The answer's body, headers and media type: JSON alone, or JSON then binary data."""
    answer = {**answer, "outputs": [tensor for tensor, _ in outputs]}
    header = msgspec.json.encode(answer)
    binary = [data for _, data in outputs if data is not None]
    if not binary:
        return header, {}, "application/json"
    return b"".join([header, *binary]), {HEADER: str(len(header))}, BINARY_MEDIA_TYPE
