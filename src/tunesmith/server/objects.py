"""The OpenAI-shaped JSON objects the API returns for the store's rows: files, fine-tuning jobs and
their checkpoints."""

from __future__ import annotations

from .store import fine_tuned_model_id


def file_object(row: dict) -> dict:
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": row["created_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def job_object(job: dict) -> dict:
    hp = job["hyperparameters"]
    public_hp = {k: hp.get(k) for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}
    return {
        "object": "fine_tuning.job",
        "id": job["id"],
        "model": job["model"],
        "created_at": job["created_at"],
        "finished_at": job["finished_at"],
        "fine_tuned_model": job["fine_tuned_model"],
        "organization_id": "org-tunesmith",
        "result_files": [],
        "status": job["status"],
        "validation_file": job["validation_file"],
        "training_file": job["training_file"],
        "hyperparameters": public_hp,
        "trained_tokens": job["trained_tokens"],
        "error": job["error"],
        "user_provided_suffix": job["suffix"],
        "seed": job["seed"],
        "estimated_finish": None,
        "integrations": [],
        "metadata": job["metadata"],
        "method": {"type": "supervised", "supervised": {"hyperparameters": public_hp}},
    }


def checkpoint_model_id(job: dict, step: int) -> str:
    base = job["fine_tuned_model"] or fine_tuned_model_id(job["model"], job["suffix"], job["id"])
    return f"{base}:ckpt-step-{step}"


def checkpoint_object(job: dict, row: dict) -> dict:
    return {
        "object": "fine_tuning.job.checkpoint",
        "id": row["id"],
        "created_at": row["created_at"],
        "fine_tuned_model_checkpoint": checkpoint_model_id(job, row["step"]),
        "fine_tuning_job_id": job["id"],
        "metrics": row["metrics"],
        "step_number": row["step"],
    }
