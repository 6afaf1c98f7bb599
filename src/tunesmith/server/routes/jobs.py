"""``/v1/fine_tuning/jobs``: create, list, retrieve, cancel, events, checkpoints, metrics.

Creating a job only records it in the store and wakes the supervisor; the worker process trains it.
"""

from __future__ import annotations

import re
import secrets

from fastapi import APIRouter, Depends, Query

from ...config import TrainConfig, spec
from ...policy import auto_hyperparameters
from ..catalog import Catalog, check_model_id
from ..config import ServerConfig
from ..deps import get_catalog, get_config, get_store, get_supervisor
from ..errors import APIError
from ..objects import checkpoint_object, job_object
from ..schemas import Hyperparameters, JobRequest
from ..store import FILE_ID_RE, JOB_ID_RE, Store
from ..supervisor import Supervisor

SUFFIX_RE = re.compile(r"^[A-Za-z0-9_-]{1,40}$")

router = APIRouter()


def job_or_404(store: Store, job_id: str) -> dict:
    if not JOB_ID_RE.match(job_id):
        raise APIError(400, f"invalid fine-tuning job id {job_id[:80]!r}: expected 'ftjob-' and 24 hex digits",
                       param="fine_tuning_job_id", code="invalid_job_id")
    job = store.get_job(job_id)
    if job is None:
        raise APIError(404, f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id", code="job_not_found")
    return job


def file_or_400(store: Store, file_id: str, param: str) -> dict:
    if not FILE_ID_RE.match(file_id):
        raise APIError(400, f"invalid {param} {file_id[:80]!r}: expected 'file-' and 24 hex digits", param=param,
                       code="invalid_file_id")
    row = store.get_file(file_id)
    if row is None:
        raise APIError(400, f"invalid {param}: no uploaded file {file_id}", param=param, code="file_not_found")
    return row


@router.post("/v1/fine_tuning/jobs")
async def create_job(req: JobRequest, store: Store = Depends(get_store), catalog: Catalog = Depends(get_catalog),
                     supervisor: Supervisor = Depends(get_supervisor), config: ServerConfig = Depends(get_config)):
    check_model_id(req.model)
    bases = [m["name"] for m in catalog.base_models()]
    if req.model not in bases:
        hint = f"; the base models here are: {', '.join(bases)}" if bases else ""
        raise APIError(400, f"model '{req.model}' is not a base model that can be fine-tuned{hint}",
                       param="model", code="model_not_available")
    training = file_or_400(store, req.training_file, "training_file")
    if req.validation_file:
        file_or_400(store, req.validation_file, "validation_file")
    if req.suffix is not None and not SUFFIX_RE.match(req.suffix):
        raise APIError(400, "suffix: 1 to 40 letters, digits, '-' or '_'", param="suffix")
    hp = resolve_hyperparameters(req, int(training["bytes"]))
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    job = store.create_job(model=req.model, training_file=req.training_file, validation_file=req.validation_file,
                           suffix=req.suffix, seed=seed, hyperparameters=hp, metadata=req.metadata)
    supervisor.wake()
    if not config.start_worker:
        store.add_event(job["id"], "This server does not run training jobs (started without a worker)", level="warn")
    return job_object(job)


@router.get("/v1/fine_tuning/jobs")
async def list_jobs(after: str | None = Query(default=None, max_length=64),
                    limit: int = Query(default=20, ge=1, le=100), store: Store = Depends(get_store)):
    jobs, has_more = store.list_jobs(after=after, limit=limit)
    return {"object": "list", "data": [job_object(j) for j in jobs], "has_more": has_more}


@router.get("/v1/fine_tuning/jobs/{job_id}")
async def get_job(job_id: str, store: Store = Depends(get_store)):
    return job_object(job_or_404(store, job_id))


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, store: Store = Depends(get_store)):
    job = job_or_404(store, job_id)
    if job["status"] in ("succeeded", "failed"):
        raise APIError(400, f"job {job_id} has already {job['status']}; there is nothing to cancel",
                       param="fine_tuning_job_id", code="job_already_finished")
    return job_object(store.request_cancel(job_id))


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
async def job_events(job_id: str, after: str | None = Query(default=None, max_length=64),
                     limit: int = Query(default=20, ge=1, le=1000), store: Store = Depends(get_store)):
    job_or_404(store, job_id)
    events, has_more = store.list_events(job_id, after=after, limit=limit)
    return {"object": "list", "data": events, "has_more": has_more}


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
async def job_checkpoints(job_id: str, after: str | None = Query(default=None, max_length=64),
                          limit: int = Query(default=10, ge=1, le=100), store: Store = Depends(get_store)):
    job = job_or_404(store, job_id)
    rows, has_more = store.list_checkpoints(job_id, after=after, limit=limit)
    data = [checkpoint_object(job, r) for r in rows]
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


@router.get("/v1/fine_tuning/jobs/{job_id}/metrics")
async def job_metrics(job_id: str, store: Store = Depends(get_store)):
    """tunesmith extension: every training/validation metrics point, oldest first (for loss curves)."""
    job_or_404(store, job_id)
    return {"object": "list", "data": store.metrics(job_id)}


def resolve_hyperparameters(req: JobRequest, training_bytes: int) -> dict:
    """The job's hyperparameters: what the request asks for (top level or under ``method``), checked,
    with ``auto`` filled in by the shared policy (tunesmith.policy) from the training file's size."""
    hp = (req.hyperparameters or Hyperparameters()).model_dump()
    if req.method is not None:
        hp.update(_method_hyperparameters(req.method))
    auto = auto_hyperparameters(training_bytes)
    epochs, batch = spec(TrainConfig, "epochs"), spec(TrainConfig, "batch_size")

    def pick(name: str, default, lo, hi, kind):
        value = hp.get(name)
        if value in (None, "auto"):
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
            raise APIError(400, f"must be 'auto' or a{'n integer' if kind is int else ' number'}",
                           param=f"hyperparameters.{name}")
        if not lo <= value <= hi:
            raise APIError(400, f"must be between {lo} and {hi}, got {value}", param=f"hyperparameters.{name}")
        return kind(value)

    out = {
        "n_epochs": pick("n_epochs", auto.epochs, epochs["min"], epochs["job_max"], int),
        "batch_size": pick("batch_size", auto.batch_size, batch["min"], batch["job_max"], int),
        "learning_rate_multiplier": 1.0,  # auto: the policy's learning rate is the default one
    }
    lrm = hp.get("learning_rate_multiplier")
    if lrm not in (None, "auto"):
        if isinstance(lrm, bool) or not isinstance(lrm, (int, float)) or not 0 < lrm <= 100:
            raise APIError(400, "must be 'auto' or a number in (0, 100]", param="hyperparameters.learning_rate_multiplier")
        out["learning_rate_multiplier"] = float(lrm)
    for extra in ("max_steps", "block_size"):
        if hp.get(extra) is not None:
            out[extra] = int(hp[extra])
    return out


def _method_hyperparameters(method: dict) -> dict:
    """The hyperparameters set under ``method.supervised`` (the newer place for them)."""
    kind = method.get("type", "supervised")
    if kind != "supervised":
        raise APIError(400, f"method type '{kind}' is not supported; tunesmith fine-tunes with 'supervised'",
                       param="method.type")
    sup = (method.get("supervised") or {}).get("hyperparameters") or {}
    try:
        return Hyperparameters(**sup).model_dump(exclude_unset=True)
    except Exception as exc:
        raise APIError(400, f"invalid method.supervised.hyperparameters: {exc}",
                       param="method.supervised.hyperparameters") from None
