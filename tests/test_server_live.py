"""A real `tunesmith serve` subprocess driven by the official openai client: generation, files,
fine-tuning jobs end to end, cancellation, auth, errors, and durability across a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = ("succeeded", "failed", "cancelled")

_WORDS = ("the quiet river ran past old stone houses where lamps burned late and the baker sang softly while "
          "children chased a grey cat along the wall under clouds of autumn light").split()


def story(paragraphs: int, seed: int = 0) -> str:
    """Deterministic prose: ``paragraphs`` paragraphs of six sentences (~75 words each)."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(paragraphs):
        sentences = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 16))).capitalize() + "."
                     for _ in range(6)]
        out.append(" ".join(sentences))
    return "\n\n".join(out) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``python -m tunesmith.server serve`` in its own process group (its training worker joins it)."""

    def __init__(self, home: Path, api_key: str | None = None, args: tuple = ()):
        self.home = home
        self.api_key = api_key
        self.args = args
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = home / f"server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> LiveServer:
        env = {**os.environ, "TUNESMITH_HOME": str(self.home), "PYTHONPATH": str(ROOT / "src")}
        env.pop("TUNESMITH_API_KEY", None)
        cmd = [sys.executable, "-m", "tunesmith.server", "serve", "--port", str(self.port), "--log-level", "warning",
               *self.args]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server did not start:\n{self.log.read_text()}")

    def client(self, api_key: str | None = None):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key or self.api_key or "unused", max_retries=0,
                             timeout=120)

    def kill(self) -> None:
        """SIGKILL the server and everything it started (the training worker)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self._reap_group()
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        self._reap_group()

    def _reap_group(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture()
def servers(tunesmith_home):
    started: list[LiveServer] = []

    def make(**kw) -> LiveServer:
        server = LiveServer(tunesmith_home, **kw)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()


def wait_for(client, job_id: str, statuses=TERMINAL, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout}s")


def all_events(client, job_id: str) -> list:
    events = list(client.fine_tuning.jobs.list_events(job_id, limit=1000))
    return events


def test_openai_client_end_to_end(servers):
    server = servers(api_key="test-key-123")
    client = server.client()

    ids = [m.id for m in client.models.list()]
    assert "tiny-llama" in ids

    comp = client.completions.create(model="tiny-llama", prompt="Once upon a time", max_tokens=5, temperature=0)
    from tunesmith import load

    expected = load("tiny-llama").generate("Once upon a time", max_tokens=5, temperature=0)[0]
    assert comp.object == "text_completion" and comp.choices[0].text == expected.text
    assert 1 <= comp.usage.completion_tokens <= 5 and comp.usage.prompt_tokens >= 4

    stream = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi there"}],
                                            max_tokens=6, temperature=1.0, seed=5, stream=True)
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(pieces) >= 2 and finishes in (["length"], ["stop"])  # token by token, then one finish

    with pytest.raises(openai.AuthenticationError) as bad_key:
        server.client(api_key="wrong-key").models.list()
    assert bad_key.value.status_code == 401 and bad_key.value.code == "invalid_api_key"
    with pytest.raises(openai.BadRequestError) as bad_req:
        client.completions.create(model="tiny-llama", prompt="x", max_tokens=3, temperature=7)
    assert bad_req.value.param == "temperature" and bad_req.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as no_model:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert no_model.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad_file:
        client.files.create(file=("rows.jsonl", b'{"text": "fine"}\n{"text": "broken\n'), purpose="fine-tune")
    assert "rows.jsonl" in bad_file.value.message and "line 2" in bad_file.value.message
    with pytest.raises((openai.BadRequestError, openai.NotFoundError)):
        client.files.retrieve("../../tunesmith.db")
    with pytest.raises((openai.BadRequestError, openai.NotFoundError)):
        client.fine_tuning.jobs.retrieve("ftjob-../../etc")
    with pytest.raises(openai.BadRequestError) as bad_id:
        client.fine_tuning.jobs.retrieve("ftjob-..")
    assert bad_id.value.param == "fine_tuning_job_id"

    upload = client.files.create(file=("story.txt", story(6).encode()), purpose="fine-tune")
    assert upload.id.startswith("file-") and upload.filename == "story.txt"
    held_out = client.files.create(file=("held.txt", story(2, seed=9).encode()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=upload.id, validation_file=held_out.id,
                                         suffix="story", seed=3, hyperparameters={"n_epochs": 1, "batch_size": 2})
    assert job.status == "queued" and job.hyperparameters.n_epochs == 1
    job = wait_for(client, job.id)
    events = all_events(client, job.id)
    messages = [e.message for e in events]
    assert job.status == "succeeded", (job.error, messages)
    assert job.fine_tuned_model == f"ft:tiny-llama:story:{job.id}" and job.trained_tokens > 0
    metrics = [e for e in events if e.type == "metrics" and e.data.get("train_loss") is not None]
    assert metrics and metrics[0].data["step"] == 1 and metrics[0].data["train_loss"] > 0
    assert messages[0] == "The job has successfully completed"  # newest first, as OpenAI orders them
    assert any(m.startswith("Checkpoint saved at step") for m in messages)
    run_valid = (server.home / "runs" / job.id / "data" / "valid.jsonl").read_text()
    assert story(2, seed=9).split(".")[0] in run_valid  # the validation file is the validation set
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert checkpoints and checkpoints[0].fine_tuning_job_id == job.id and checkpoints[0].step_number >= 1

    assert job.fine_tuned_model in [m.id for m in client.models.list()]
    tuned = client.completions.create(model=job.fine_tuned_model, prompt="The river", max_tokens=3, temperature=0)
    assert tuned.model == job.fine_tuned_model and tuned.usage.completion_tokens >= 1
    chat = client.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3)
    assert chat.choices[0].message.role == "assistant"

    # cancel: a long job stops within a few seconds of the request
    big = client.files.create(file=("long.txt", story(120, seed=1).encode()), purpose="fine-tune")
    long_job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=big.id,
                                              hyperparameters={"n_epochs": 50, "batch_size": 1})
    deadline = time.monotonic() + 120
    while not any(e.type == "metrics" for e in all_events(client, long_job.id)):
        assert time.monotonic() < deadline, "the long job never started training"
        time.sleep(0.3)
    asked = time.monotonic()
    client.fine_tuning.jobs.cancel(long_job.id)
    long_job = wait_for(client, long_job.id, timeout=30)
    assert long_job.status == "cancelled" and time.monotonic() - asked < 15
    assert long_job.fine_tuned_model is None
    assert any("cancelled at step" in e.message for e in all_events(client, long_job.id))


def test_jobs_survive_a_killed_server(servers, tunesmith_home):
    first = servers()
    client = first.client()
    big = client.files.create(file=("long.txt", story(120, seed=2).encode()), purpose="fine-tune")
    small = client.files.create(file=("short.txt", story(6).encode()), purpose="fine-tune")
    long_job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=big.id,
                                              hyperparameters={"n_epochs": 50, "batch_size": 1})
    queued = client.fine_tuning.jobs.create(model="tiny-llama", training_file=small.id,
                                            hyperparameters={"n_epochs": 1, "batch_size": 2})
    deadline = time.monotonic() + 120
    while not any(e.type == "metrics" for e in all_events(client, long_job.id)):
        assert time.monotonic() < deadline, "the long job never started training"
        time.sleep(0.3)
    assert client.fine_tuning.jobs.retrieve(queued.id).status == "queued"  # FIFO: one job at a time

    first.kill()  # SIGKILL: server and worker die without a word
    from tunesmith.server.store import Store

    assert Store(tunesmith_home).get_job(long_job.id)["status"] == "running"  # as the dead server left it

    second = servers()
    client = second.client()
    failed = client.fine_tuning.jobs.retrieve(long_job.id)
    assert failed.status == "failed"  # found at startup, never left "running"
    assert "the server stopped while this job was running" in failed.error.message
    assert f"tunesmith jobs retry {long_job.id}" in failed.error.message
    state = json.loads((tunesmith_home / "runs" / long_job.id / "status.json").read_text())
    assert state["status"] == "failed" and state["error"] == failed.error.message  # the run agrees with the job
    assert {f.id for f in client.files.list()} == {big.id, small.id}
    done = wait_for(client, queued.id)
    assert done.status == "succeeded" and done.fine_tuned_model
    assert [j.id for j in client.fine_tuning.jobs.list(limit=10)] == [queued.id, long_job.id]


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie left for a non-reaping init counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def test_the_worker_stops_with_its_server(servers, tunesmith_home):
    """SIGKILL of the server alone: its training worker stops too, after a clean last step; the job is
    failed with a restart hint and its run directory says failed as well."""
    from tunesmith.server.store import Store

    server = servers()
    client = server.client()
    big = client.files.create(file=("long.txt", story(120, seed=4).encode()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=big.id,
                                         hyperparameters={"n_epochs": 50, "batch_size": 1})
    deadline = time.monotonic() + 120
    while not any(e.type == "metrics" for e in all_events(client, job.id)):
        assert time.monotonic() < deadline, "the job never started training"
        time.sleep(0.3)
    store = Store(tunesmith_home)
    worker = store.get_job(job.id)["worker_pid"]
    assert worker and _alive(worker)

    os.kill(server.proc.pid, signal.SIGKILL)  # the server only, not its process group
    server.proc.wait(10)
    deadline = time.monotonic() + 60
    while _alive(worker):
        assert time.monotonic() < deadline, "the training worker outlived its server"
        time.sleep(0.2)
    row = store.get_job(job.id)
    assert row["status"] == "failed" and row["error"]["code"] == "server_stopped"
    assert f"tunesmith jobs retry {job.id}" in row["error"]["message"]
    state = json.loads((tunesmith_home / "runs" / job.id / "status.json").read_text())
    assert state["status"] == "failed" and state["error"] == row["error"]["message"]
    assert store.list_checkpoints(job.id)[0]  # it saved a checkpoint as it stopped


@pytest.mark.real_model
def test_real_bundled_model_through_the_openai_client(servers, real_base_dir):
    """The real SmolLM2-135M-Instruct answers through /v1/completions and /v1/chat/completions."""
    client = servers().client()
    done = client.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=8,
                                     temperature=0)
    assert "Paris" in done.choices[0].text
    chat = client.chat.completions.create(
        model="smollm2-135m", temperature=0, max_tokens=24,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
    )
    assert "Paris" in chat.choices[0].message.content
    assert chat.usage.prompt_tokens > 10 and chat.usage.completion_tokens > 0
