"""From request bodies to image tensors: TF Serving's row and columnar forms, classify examples,
Open Inference Protocol tensors and uploaded files.

Parsing finds the images and checks the request's shape (cheap; the common predict bodies take a
faster road, :mod:`tirelib.serve.fastjson`, with the same answers); :mod:`tirelib.serve.decoding`
checks them against the pixel budget, then decodes and resizes them with the served model's own
:class:`~tirelib.preprocessing.Preprocessing` (heavy, run off the event loop). Every problem is
a :class:`~tirelib.errors.DataError` whose message names the instance (``instances[3]: …``) and
what is allowed; the routes turn it into a 400 (an image over its pixel budget: a 413).
"""

from __future__ import annotations

import base64
import binascii
import functools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import torch

from tirelib.errors import DataError
from tirelib.preprocessing import Preprocessing, open_image
from tirelib.serve.limits import excerpt

FLOAT_INPUT = "images"
"""The float input: HWC images with values in [0, 1] (v2: FP32 ``[N, H, W, 3]``)."""
BYTES_INPUT = "image_bytes"
"""The encoded input: JPEG/PNG/… bytes (``{"b64": …}``; v2: BYTES ``[N]``, base64 text)."""
INPUT_NAMES = (FLOAT_INPUT, "image", BYTES_INPUT)
"""Names accepted for the image in named inputs and classify examples."""
FLOAT_TYPES = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}

_SHAPE_HINT = 'an image is [height, width, 3] nested lists of floats in [0, 1], or {"b64": ...}'


@dataclass(frozen=True)
class Limits:
    """What one request may hold."""

    max_instances: int = 256
    max_image_side: int = 4096


RawImage = bytes | np.ndarray | list[Any]
Located = tuple[str, RawImage]
"""An image as sent, with where it was in the request (for error messages)."""


def check_count(count: int, limits: Limits, what: str = "instances") -> None:
    if count == 0:
        raise DataError(f"no images given: {what} is empty")
    if count > limits.max_instances:
        raise DataError(
            f"{count} images in one request, at most {limits.max_instances} are allowed; "
            "split the request"
        )


def _names(keys: Iterable[Any]) -> str:
    """Keys for an error message: sorted, at most five, each an excerpt."""
    names = sorted(map(str, keys))
    shown = ", ".join(excerpt(name, 40) for name in names[:5])
    return f"[{shown}" + (f" and {len(names) - 5:,} more]" if len(names) > 5 else "]")


def _one_image(value: Any) -> bool:
    """``value`` is a single HWC image (its items are pixel rows), not a list of images."""
    probe = value
    for _ in range(3):
        if not isinstance(probe, list) or not probe:
            return False
        probe = probe[0]
    return isinstance(probe, int | float)


@functools.cache
def _nested_floats(depth: int) -> Any:
    kind: Any = float
    for _ in range(depth):
        kind = list[kind]
    return kind


_JSON_KINDS = {"str": "a string", "bool": "a boolean", "null": "null", "object": "an object"}
_CONVERT_ERROR = re.compile(r"Expected `(\w+)`, got `(\w+)` - at `\$(.*)`")


def pixel_array(value: list[Any], dtype: Any = np.float32) -> np.ndarray:
    """Nested lists of numbers as an array. Strings, booleans and nulls are refused: numpy
    would silently read ``"0.5"`` and ``true`` as numbers."""
    depth = 0
    probe: Any = value  # the nesting of the first item decides the type checked
    while isinstance(probe, list):
        depth += 1
        probe = probe[0] if probe else None
    try:
        msgspec.convert(value, _nested_floats(depth), strict=True)
    except msgspec.ValidationError as error:
        found = _CONVERT_ERROR.match(str(error))
        if found and found[1] == "float" and found[2] in _JSON_KINDS:
            raise DataError(
                f"pixel values must be numbers in [0, 1], got {_JSON_KINDS[found[2]]} "
                f"at {found[3] or 'the top'}"
            ) from error
        detail = str(error).replace("`$", "`")
        raise DataError(
            f"{_SHAPE_HINT}; ragged or non-numeric values are not allowed ({detail})"
        ) from error
    try:
        with np.errstate(over="ignore"):  # too large for float32: inf, refused as not finite
            return np.asarray(value, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as error:
        raise DataError(
            f"{_SHAPE_HINT}; ragged or non-numeric values are not allowed ({error})"
        ) from error


def decode_b64(value: Any, where: str) -> bytes:
    """Base64 text (standard or URL-safe alphabet, padding optional) to bytes."""
    if not isinstance(value, str):
        raise DataError(f'{where}: "b64" must be base64 text, got {type(value).__name__}')
    text = value.strip()
    altchars = b"-_" if ("-" in text or "_" in text) else None
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as error:
        raise DataError(f'{where}: "b64" is not valid base64 text ({error})') from error


def _image(value: Any, where: str, *, named: bool = True) -> RawImage:
    """One image of the row form: nested lists, ``{"b64": …}``, or ``{"images": <image>}``."""
    if isinstance(value, list):
        return value
    if isinstance(value, Mapping):
        keys = set(value)
        if keys == {"b64"}:
            return decode_b64(value["b64"], where)
        if named and len(keys) == 1 and next(iter(keys)) in INPUT_NAMES:
            key = next(iter(keys))
            return _image(value[key], f"{where}.{key}", named=False)
        raise DataError(
            f"{where}: unexpected keys {_names(keys)}; {_SHAPE_HINT}, "
            f"or a single named input ({', '.join(INPUT_NAMES)})"
        )
    raise DataError(f"{where}: got {type(value).__name__}; {_SHAPE_HINT}")


def from_instances(instances: Sequence[Any], limits: Limits) -> list[Located]:
    """TF Serving's row form: ``{"instances": [image, image, …]}``."""
    if _one_image(instances):
        raise DataError(
            '"instances" holds one image (rows of pixels) where a list of images belongs: '
            'an image is [height, width, 3]; send {"instances": [image]}'
        )
    check_count(len(instances), limits, '"instances"')
    return [(f"instances[{i}]", _image(v, f"instances[{i}]")) for i, v in enumerate(instances)]


def from_columnar(inputs: Any, limits: Limits) -> list[Located]:
    """TF Serving's columnar form: ``{"inputs": [image, …]}`` or ``{"inputs": {"images": …}}``."""
    where = "inputs"
    value = inputs
    if isinstance(value, Mapping):
        keys = set(value)
        if keys == {"b64"}:
            return [(where, decode_b64(value["b64"], where))]
        if len(keys) != 1 or next(iter(keys)) not in INPUT_NAMES:
            raise DataError(
                f'"inputs" must be a list of images or one named input '
                f"({', '.join(INPUT_NAMES)}), got the keys {_names(keys)}"
            )
        key = next(iter(keys))
        where, value = f"inputs.{key}", value[key]
        if isinstance(value, Mapping):
            return [(where, _image(value, where, named=False))]
    if not isinstance(value, list):
        raise DataError(f'"{where}" must be a list of images, got {type(value).__name__}')
    if _one_image(value):  # TF Serving reads it as a batch of rows: a silent misread
        raise DataError(
            f'"{where}" holds one image of shape [height, width, 3]; in the columnar form '
            "the first dimension is the batch ([N, height, width, 3]): send [image]"
        )
    check_count(len(value), limits, f'"{where}"')
    return [(f"{where}[{i}]", _image(v, f"{where}[{i}]", named=False)) for i, v in enumerate(value)]


def from_examples(
    examples: Sequence[Mapping[str, Any]], context: Mapping[str, Any] | None, limits: Limits
) -> list[Located]:
    """TF Serving's classify form: each example (merged with ``context``) holds one image."""
    check_count(len(examples), limits, '"examples"')
    found = []
    for i, example in enumerate(examples):
        where = f"examples[{i}]"
        features = {**(context or {}), **example}
        names = [name for name in INPUT_NAMES if name in features]
        if len(names) != 1:
            raise DataError(
                f"{where}: an example needs exactly one image feature "
                f"({', '.join(INPUT_NAMES)}), got {_names(features) if features else 'none'}"
            )
        found.append((where, _image(features[names[0]], f"{where}.{names[0]}", named=False)))
    return found


def from_v2_tensor(
    *, name: str, datatype: str, shape: Sequence[int], data: Any, limits: Limits
) -> list[Located]:
    """An Open Inference Protocol input: FP32 ``[N, H, W, 3]`` or BYTES ``[N]`` (base64 text)."""
    where = f"input {excerpt(name, 40)}"
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise DataError(f"{where}: shape must hold non-negative integers, got {list(shape)}")
    if datatype == "BYTES":
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise DataError(f"{where}: BYTES input must have shape [N] (one image each)")
        if not isinstance(data, list) or len(data) != shape[0]:
            raise DataError(f"{where}: shape {list(shape)} needs a list of {shape[0]} items")
        check_count(shape[0], limits, where)
        items = [item[0] if isinstance(item, list) and len(item) == 1 else item for item in data]
        return [
            (f"{where}[{i}]", _image(item, f"{where}[{i}]", named=False))
            if isinstance(item, Mapping)
            else (f"{where}[{i}]", decode_b64(item, f"{where}[{i}]"))
            for i, item in enumerate(items)
        ]
    if datatype not in FLOAT_TYPES:
        raise DataError(
            f"{where}: datatype {datatype!r} is not supported; use FP32 (images [N, H, W, 3] in "
            "[0, 1]) or BYTES (encoded images, base64 text)"
        )
    if len(shape) != 4:
        raise DataError(
            f"{where}: {datatype} input must have shape [N, H, W, 3], got {list(shape)}"
        )
    count, height, width, _ = shape
    check_count(count, limits, where)
    try:
        _check_sides(height, width, limits)
    except DataError as error:
        raise DataError(f"{where}: {error}") from error
    expected = math.prod(shape)
    if not isinstance(data, list):
        raise DataError(f"{where}: data must be a list of numbers, got {type(data).__name__}")
    try:
        array = pixel_array(data, FLOAT_TYPES[datatype])
    except DataError as error:
        raise DataError(f"{where}: {error}") from error
    if array.size != expected:
        raise DataError(
            f"{where}: shape {list(shape)} needs {expected} values, the data holds {array.size}"
        )
    batch = array.reshape(shape)
    return [(f"{where}[{i}]", batch[i]) for i in range(count)]


def _check_sides(height: int, width: int, limits: Limits) -> None:
    if height > limits.max_image_side or width > limits.max_image_side:
        raise DataError(
            f"an image of {width}x{height} pixels is too large; at most "
            f"{limits.max_image_side} pixels on a side are allowed"
        )


def to_tensor(prep: Preprocessing, image: RawImage, limits: Limits, where: str) -> torch.Tensor:
    """One image, decoded (bytes) or checked (floats), resized and normalised by ``prep``."""
    try:
        if isinstance(image, bytes):
            # The routes decode through tirelib.serve.decoding, within the pixel budget; here
            # too the header is read first, so a decompression bomb is refused, never decoded.
            header, (width, height) = open_image(image)
            header.close()
            _check_sides(height, width, limits)
            return prep.from_bytes(image)
        array = image if isinstance(image, np.ndarray) else pixel_array(image)
        if array.ndim == 2:  # a grayscale [H, W] would read a row of pixels as an image
            raise DataError(
                f"an image must have shape [height, width, 3] (HWC), got {list(array.shape)}; "
                "grayscale is [height, width, 1]"
            )
        if array.ndim == 4:
            raise DataError(
                f"got a batch of shape {list(array.shape)} where one image belongs; "
                "list each image as its own instance"
            )
        if array.ndim in (2, 3):
            _check_sides(array.shape[0], array.shape[1], limits)
        return prep.from_array(array)
    except DataError as error:
        raise type(error)(f"{where}: {error}") from error  # a 413 stays a 413
