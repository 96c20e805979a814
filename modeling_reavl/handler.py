# Copyright 2026 The REAVL authors. Licensed under the Apache License, Version 2.0.
"""Inference Endpoints custom handler for an exported REAVL repo (`handler.py` at the repo root).

Inference Endpoints imports this file from the repository folder and calls `EndpointHandler(path)(data)` with the
request's JSON body. The handler serves the repo's own pipeline (`knowledge-vqa` for the question-answering head,
`multimodal-entity-linking` for the entity-linking head: the task recorded in `config.json`), loaded with
`pipeline(model=path, trust_remote_code=True)`.

Request body:

```json
{"inputs": {"image": "<base64 PNG/JPEG, optionally as a data: URL>", "question": "Which river crosses it?"},
 "parameters": {"top_k": 3}}
```

(`"sentence"` and `"mention"` instead of `"question"` for entity linking; `"inputs"` may be a list of such dicts;
`"image"` may also be raw bytes when the handler is called from Python.) The response is the pipeline's output:
answers with scores and the evidence (entry ids, titles, retrieval scores, gates).

Images arrive only inline: URLs and server paths are refused, so a request cannot make the endpoint fetch
arbitrary addresses or read its own files.

Local test:

```python
>>> from handler import EndpointHandler
>>> handler = EndpointHandler("path/to/exported/repo")
>>> handler({"inputs": {"image": base64_png, "question": "What is shown?"}, "parameters": {"top_k": 2}})
```

This file imports only installed packages: it runs on an endpoint that has transformers but not this project.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from PIL import Image, UnidentifiedImageError
from transformers import pipeline


ALLOWED_PARAMETERS = ("top_k", "use_knowledge")


class EndpointHandler:
    """Callable that answers Inference Endpoints requests with the repo's REAVL pipeline."""

    def __init__(self, path: str = "", device: int | str | None = None):
        self.pipeline = pipeline(model=path or ".", trust_remote_code=True, device=device)
        self.text_keys = ("question",) if self.pipeline.task == "knowledge-vqa" else ("sentence", "mention")

    def __call__(self, data: dict[str, Any]) -> dict[str, Any] | list:
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError('the request body must be a JSON object with "inputs" (and optionally "parameters")')
        parameters = data.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ValueError(f'"parameters" must be an object, got {type(parameters).__name__}')
        unknown = sorted(set(parameters) - set(self._allowed_parameters()))
        if unknown:
            raise ValueError(f'unknown parameters {unknown}; allowed: {list(self._allowed_parameters())}')
        inputs = data["inputs"]
        if isinstance(inputs, list):
            return [self.pipeline(self._example(item, index), **parameters) for index, item in enumerate(inputs)]
        return self.pipeline(self._example(inputs, None), **parameters)

    def _allowed_parameters(self) -> tuple[str, ...]:
        return ALLOWED_PARAMETERS if self.pipeline.task == "knowledge-vqa" else ("top_k",)

    def _example(self, inputs: Any, index: int | None) -> dict[str, Any]:
        where = '"inputs"' if index is None else f'"inputs"[{index}]'
        if not isinstance(inputs, dict):
            raise ValueError(f'{where} must be an object with "image" and {self._text_keys_listed()}')
        if inputs.get("image") in (None, "", b""):
            raise ValueError(f'{where} has no "image": send the image as a base64 string')
        missing = [key for key in self.text_keys[:1] if not inputs.get(key)]
        if missing:
            raise ValueError(f'{where} has no "{missing[0]}": send it as a non-empty string')
        example = {key: inputs[key] for key in self.text_keys if inputs.get(key) is not None}
        example["image"] = decode_image(inputs["image"], where=f"{where}.image")
        return example

    def _text_keys_listed(self) -> str:
        return " and ".join(f'"{key}"' for key in self.text_keys)


def decode_image(value: str | bytes | bytearray, where: str = "image") -> Image.Image:
    """An RGB PIL image from raw bytes or a base64 string (a `data:image/...;base64,` prefix is allowed).

    Raises:
        ValueError: the value is not base64, or its bytes are not an image PIL can read.
    """
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("data:"):
            text = text.partition(",")[2]
        if text.startswith(("http://", "https://")):
            raise ValueError(f"{where} must be inline base64 data; URLs are not fetched by this endpoint")
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as error:
            raise ValueError(
                f"{where} is not valid base64 ({error}); send the image file's bytes base64-encoded"
            ) from None
    elif isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
    else:
        raise ValueError(f"{where} must be a base64 string or bytes, got {type(value).__name__}")
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{where} decodes to {len(raw)} bytes that are not a readable image ({error})") from None
    return image.convert("RGB")


__all__ = ["EndpointHandler", "decode_image"]
