"""Reading request bodies: one decoder for the TF Serving and the Open Inference Protocol routes.

A body is read whatever its ``Content-Type`` says, as TensorFlow Serving does (``curl -d``
sends ``application/x-www-form-urlencoded``). The common bodies take a fast road: msgspec
decodes the envelope and the image numbers go straight into one numpy array
(:mod:`tirelib.serve.fastjson`), TF Serving's ``instances``/``inputs`` and an Open Inference
Protocol tensor's ``data`` alike; the JSON part of a body with binary tensor data
(:mod:`tirelib.serve.binary`) is read the same way. Anything the fast road does not take is read
the general way, by the pydantic models of :mod:`tirelib.serve.schemas` and the readers of
:mod:`tirelib.serve.inputs`, which also say what is wrong: the fast road never answers
differently, it only answers sooner. Every reader runs in a worker thread (the routes call it
through :meth:`tirelib.serve.deps.Inference.run`) and raises :class:`~tirelib.errors.DataError`
for a bad body, answered with a 400.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec

from tirelib.errors import DataError
from tirelib.serve import binary
from tirelib.serve.fastjson import PredictImages, read_float_array, read_predict_images
from tirelib.serve.inputs import (
    FLOAT_TYPES,
    Limits,
    Located,
    _check_sides,
    check_count,
    from_columnar,
    from_examples,
    from_instances,
)
from tirelib.serve.limits import check_json_depth, excerpt
from tirelib.serve.schemas import (
    ClassifyRequest,
    PredictRequest,
    V2InferRequest,
    parse_body,
)

SIGNATURE = "serving_default"
OUTPUTS = ("probabilities", "label")
"""The outputs of the Open Inference Protocol routes, in the order they are answered."""


@dataclass(frozen=True)
class Images:
    """The images of a body whose answer needs nothing else from it."""

    images: list[Located]


@dataclass(frozen=True)
class InferBody:
    """An Open Inference Protocol request: its JSON (without tensor data), the outputs to
    answer (each with whether it goes as binary data) and the images of its input."""

    request: V2InferRequest
    outputs: list[tuple[str, bool]]
    images: list[Located]


def check_signature(signature_name: str | None) -> None:
    if signature_name not in (None, "", SIGNATURE):
        raise DataError(
            f"unknown signature_name {excerpt(signature_name)}; this model has only {SIGNATURE!r}"
        )


# --------------------------------------------------------------------------- TF Serving


def read_predict(raw: bytes, limits: Limits) -> PredictImages:
    """A predict body's images (``row``: the ``instances`` form, answered as ``predictions``)."""
    fast = read_predict_images(raw, limits)
    if fast is not None:
        return fast
    body = parse_body(raw, PredictRequest)
    check_signature(body.signature_name)
    if body.instances is not None:
        return PredictImages(row=True, images=from_instances(body.instances, limits))
    return PredictImages(row=False, images=from_columnar(body.inputs, limits))


def read_classify(raw: bytes, limits: Limits) -> Images:
    """A classify body's images, one per example (merged with the context)."""
    body = parse_body(raw, ClassifyRequest)
    check_signature(body.signature_name)
    return Images(from_examples(body.examples, body.context, limits))


# --------------------------------------------------------------------------- v2


class _Tensor(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    shape: list[Annotated[int, msgspec.Meta(ge=0)]]
    datatype: Literal["FP32", "FP16", "FP64", "BYTES", "UINT8"]
    parameters: dict[str, Any] | None = None
    data: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET


class _Output(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    parameters: dict[str, Any] | None = None


class _Infer(msgspec.Struct, forbid_unknown_fields=True):
    inputs: list[_Tensor]
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[_Output] | None = None


_infer = msgspec.json.Decoder(_Infer)
_UNREADABLE = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def read_infer(raw: bytes, header_length: str | None, limits: Limits) -> InferBody:
    """An infer body: JSON, or JSON then binary tensor data (``header_length``: the value of
    its ``Inference-Header-Content-Length`` header, if sent)."""
    split = binary.split_body(raw, header_length)
    fast = _read_infer_fast(split, limits)
    if fast is not None:
        return fast
    try:
        request = parse_body(split.json, V2InferRequest)
    except DataError as error:
        if header_length is None and f'"{binary.SIZE}"'.encode() in raw:
            raise DataError(
                f"{error}; the body names binary tensor data ({binary.SIZE}) but has no "
                f"{binary.HEADER} header saying where its JSON part ends"
            ) from error
        raise
    return _infer_body(request, split.binary, limits)


def _infer_body(request: V2InferRequest, data: memoryview | None, limits: Limits) -> InferBody:
    chunks = binary.input_chunks(request.inputs, data)
    outputs = binary.requested_outputs(request, OUTPUTS)
    return InferBody(request, outputs, binary.input_images(request.inputs[0], chunks[0], limits))


def _read_infer_fast(split: binary.Body, limits: Limits) -> InferBody | None:
    """The common infer bodies: float tensors whose ``data`` is in the JSON (decoded straight
    into an array), and any whose data is binary; None for the general reader to decide."""
    check_json_depth(split.json)  # the general reader's first check, so the same answer
    try:
        envelope = _infer.decode(split.json)
    except _UNREADABLE:
        return None
    if len(envelope.inputs) != 1:
        return None
    tensor = envelope.inputs[0]
    if tensor.data is msgspec.UNSET:  # binary data, or none (input_chunks says so)
        return _infer_body(_model_of(envelope), split.binary, limits)
    if tensor.parameters or split.binary is not None or tensor.datatype not in FLOAT_TYPES:
        return None
    shape = tuple(tensor.shape)
    if not _images_fit(shape, limits):
        return None
    batch = read_float_array(bytes(tensor.data), shape, FLOAT_TYPES[tensor.datatype])
    if batch is None:
        return None
    request = _model_of(envelope)
    outputs = binary.requested_outputs(request, OUTPUTS)
    where = f"input {excerpt(tensor.name, 40)}"
    return InferBody(request, outputs, [(f"{where}[{i}]", batch[i]) for i in range(len(batch))])


def _images_fit(shape: Sequence[int], limits: Limits) -> bool:
    """``shape`` is ``[N, H, W, 3]`` within the limits (else the general reader says why)."""
    if len(shape) != 4 or shape[3] != 3:
        return False
    try:
        check_count(shape[0], limits)
        _check_sides(shape[1], shape[2], limits)
    except DataError:
        return False
    return True


def _model_of(envelope: _Infer) -> V2InferRequest:
    """The envelope as the general reader's model, without tensor data (a few fields: cheap)."""
    inputs = [
        {"name": t.name, "shape": t.shape, "datatype": t.datatype, "parameters": t.parameters}
        for t in envelope.inputs
    ]
    outputs = envelope.outputs
    return V2InferRequest.model_validate(
        {
            "id": envelope.id,
            "parameters": envelope.parameters,
            "inputs": inputs,
            "outputs": None
            if outputs is None
            else [{"name": o.name, "parameters": o.parameters} for o in outputs],
        }
    )
