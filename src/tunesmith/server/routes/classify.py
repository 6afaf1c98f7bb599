"""``POST /v1/classifications``: labels with probabilities, or scores, from a classifier or
regressor run (``tunesmith train DATA --task classify|regress``).

The model id is resolved by the catalog like any other; the loaded ``Classifier`` lives in the
same model cache, and a request takes a slot of the same admission queue as a generation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from ...classify import is_classifier_run
from ..deps import get_generator
from ..errors import APIError
from ..generation import Generator

router = APIRouter()

MAX_INPUTS = 2048
MAX_INPUT_CHARS = 100_000


class ClassificationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=256)
    input: Union[str, list[str]]


@router.post("/v1/classifications")
async def classifications(req: ClassificationRequest, generator: Generator = Depends(get_generator)):
    texts = [req.input] if isinstance(req.input, str) else list(req.input)
    if not texts or len(texts) > MAX_INPUTS:
        raise APIError(400, f"input: give between 1 and {MAX_INPUTS} texts", param="input")
    for i, text in enumerate(texts):
        if not text.strip():
            raise APIError(400, f"input[{i}] is empty", param="input")
        if len(text) > MAX_INPUT_CHARS:
            raise APIError(400, f"input[{i}] is longer than {MAX_INPUT_CHARS} characters", param="input")
    key, source = generator.catalog.resolve(req.model)
    if not is_classifier_run(Path(source)):
        raise APIError(400, f"the model '{req.model}' is not a classifier or regressor run; "
                       "/v1/classifications needs one (tunesmith train DATA --task classify)",
                       param="model", code="model_not_classifier")
    ticket = generator.queue.admit()
    try:
        await ticket.acquire()
        classifier = await generator.run(generator.cache.get, key, source)
        results = await generator.run(classifier.predict, texts)
    finally:
        ticket.release()
    data = [{"object": "classification", "index": i, **result} for i, result in enumerate(results)]
    return {"object": "list", "model": req.model, "task": classifier.task, "data": data}
