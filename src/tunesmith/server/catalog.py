"""Which model ids this server answers to, and where each one's weights are.

- base models (``tunesmith models list``),
- fine-tuned models of succeeded jobs (``ft:BASE:SUFFIX:JOB``),
- their checkpoints (``ft:BASE:SUFFIX:JOB:ckpt-step-N``, as ``/v1/fine_tuning/jobs/JOB/checkpoints``
  names them), while the run still keeps that checkpoint on disk,
- succeeded run directories under ``$TUNESMITH_HOME/runs`` (by directory name).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from ..models import list_models
from ..rundir import Run, is_run_dir
from .errors import APIError
from .objects import checkpoint_model_id
from .store import JOB_ID_RE, Store

MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,199}$")
CHECKPOINT_ID_RE = re.compile(r"^ft:.+:(ftjob-[0-9a-f]{24}):ckpt-step-([0-9]{1,9})$")
BASES_TTL = 5.0  # seconds between scans of the model cache


def check_model_id(model_id: str, param: str = "model") -> None:
    if not MODEL_ID_RE.match(model_id) or ".." in model_id:
        raise APIError(400, f"invalid model id {model_id[:80]!r}: letters, digits and . _ : + - only",
                       param=param, code="invalid_model")


def not_found(model_id: str, detail: str = "") -> APIError:
    return APIError(404, f"The model '{model_id}' does not exist{detail}.", param="model", code="model_not_found")


class Catalog:
    def __init__(self, store: Store):
        self.store = store
        self._bases: list[dict] = []
        self._bases_at = float("-inf")

    def base_models(self) -> list[dict]:
        if time.monotonic() - self._bases_at > BASES_TTL:
            self._bases = [m for m in list_models() if m.get("available")]
            self._bases_at = time.monotonic()
        return self._bases

    def finished_runs(self) -> list[tuple[str, Path, int]]:
        """(id, path, created) for succeeded run directories under $TUNESMITH_HOME/runs that no job owns."""
        out = []
        root = self.store.runs_dir
        if not root.is_dir():
            return out
        for path in sorted(root.iterdir()):
            name = path.name
            if name.startswith(".") or JOB_ID_RE.match(name) or not MODEL_ID_RE.match(name):
                continue
            if not is_run_dir(path):
                continue
            try:
                status = json.loads((path / "status.json").read_text()).get("status")
            except (OSError, json.JSONDecodeError):
                continue
            if status == "succeeded":
                out.append((name, path, int(path.stat().st_mtime)))
        return out

    def model_objects(self) -> list[dict]:
        rows = []
        for m in self.base_models():
            rows.append({"id": m["name"], "object": "model", "created": 0, "owned_by": "tunesmith",
                         "kind": "base", "description": m.get("description", "")})
        for job in reversed(self.store.succeeded_jobs()):
            rows.append({"id": job["fine_tuned_model"], "object": "model",
                         "created": job["finished_at"] or job["created_at"], "owned_by": "user",
                         "kind": "fine-tune", "parent": job["model"], "job": job["id"]})
        for name, path, created in self.finished_runs():
            task = Run(path).config.get("task")  # classify/regress: answered by /v1/classifications
            rows.append({"id": name, "object": "model", "created": created, "owned_by": "user", "kind": "run",
                         **({"task": task} if task else {})})
        return rows

    def model_object(self, model_id: str) -> dict:
        """``GET /v1/models/{id}``: a listed model, or a checkpoint of a job."""
        check_model_id(model_id)
        for row in self.model_objects():
            if row["id"] == model_id:
                return row
        found = self.checkpoint(model_id)
        if found is None:
            raise not_found(model_id)
        job, path = found
        return {"id": model_id, "object": "model", "created": int(path.stat().st_mtime), "owned_by": "user",
                "kind": "checkpoint", "parent": job["model"], "job": job["id"]}

    def resolve(self, model_id: str) -> tuple[str, str]:
        """(cache key, what the model cache loads) for an allowed model id, else 404."""
        check_model_id(model_id)
        if model_id.startswith("ft:"):
            job = self.store.find_job_by_model(model_id)
            if job and job["status"] == "succeeded":
                return model_id, job["run_dir"]
            found = self.checkpoint(model_id)
            if found is not None:
                return model_id, str(found[1])
        elif any(m["name"] == model_id for m in self.base_models()):
            return model_id, model_id
        else:
            for name, path, _ in self.finished_runs():
                if name == model_id:
                    return model_id, str(path)
        raise APIError(404, f"The model '{model_id}' does not exist. GET /v1/models lists the available ones.",
                       param="model", code="model_not_found")

    def checkpoint(self, model_id: str) -> tuple[dict, Path] | None:
        """(job, checkpoint directory) for a checkpoint id; None when the id names no job's checkpoint;
        a 404 saying so when the run no longer keeps that checkpoint."""
        match = CHECKPOINT_ID_RE.match(model_id)
        job = self.store.get_job(match[1]) if match else None
        if job is None or checkpoint_model_id(job, int(match[2])) != model_id:
            return None
        step = int(match[2])
        kept = Run(job["run_dir"]).checkpoints() if is_run_dir(job["run_dir"]) else []
        for ckpt in kept:
            if ckpt["step"] == step:
                return job, Path(ckpt["path"])
        steps = ", ".join(str(c["step"]) for c in kept) or "none"
        raise not_found(model_id, f": job {job['id']} no longer keeps its checkpoint at step {step} "
                        f"(a run keeps only its latest checkpoints; steps on disk: {steps})")
