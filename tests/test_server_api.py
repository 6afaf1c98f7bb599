"""The HTTP API in-process (FastAPI TestClient): error shapes, auth, limits, files, jobs, generation."""

from __future__ import annotations

import asyncio
import json
import re
import threading

import httpx
import pytest
from fastapi.testclient import TestClient
from test_copies import sherlock  # noqa: F401 - the prepared book, a fixture

from tunesmith.server.app import ServerConfig, create_app
from tunesmith.server.models_cache import ModelCache
from tunesmith.server.store import FILE_ID_RE, JOB_ID_RE

TEXT = ("The lamplighter walked the length of the harbour wall each evening, and the gulls followed him "
        "as if he carried bread instead of fire.\n\n") * 12


def _error(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.fixture()
def client(tunesmith_home):
    app = create_app(ServerConfig(home=tunesmith_home, start_worker=False))
    with TestClient(app) as c:
        yield c


def test_errors_are_openai_shaped(client):
    err = _error(client.get("/v1/no-such-route"), 404)
    assert err["type"] == "invalid_request_error" and "/v1/no-such-route" in err["message"]
    err = _error(client.delete("/v1/models"), 405)
    assert err["code"] == "method_not_allowed"
    err = _error(client.post("/v1/completions", json={"model": "tiny-llama", "temperature": 9}), 400)
    assert err["param"] == "temperature" and err["type"] == "invalid_request_error"
    err = _error(client.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": [{"role": "wizard"}]}), 400)
    assert err["param"] == "messages[0].role"
    err = _error(client.post("/v1/completions", json={"prompt": "x"}), 400)
    assert err["param"] == "model" and err["code"] == "missing_required_parameter"
    err = _error(client.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"}), 400)
    assert err["code"] == "invalid_json"
    err = _error(client.post("/v1/completions", json={"model": "tiny-llama", "max_tokens": 5000}), 400)
    assert err["param"] == "max_tokens" and "2048" in err["message"]
    err = _error(client.post("/v1/completions", json={"model": "no-such-model", "prompt": "x"}), 404)
    assert err["code"] == "model_not_found"
    err = _error(client.post("/v1/completions", json={"model": "tiny-llama", "prompt": ["a", "b"]}), 400)
    assert err["param"] == "prompt"
    err = _error(client.post("/v1/completions", json={"model": "tiny-llama", "stop": ["a", "b", "c", "d", "e"]}), 400)
    assert err["param"] == "stop"


def test_path_traversal_is_rejected(client, tunesmith_home):
    (tunesmith_home / "secret.txt").write_text("top secret")
    for model in ("../secret", "/etc/passwd", "..", "tiny-llama/../../x", "ft:a:b:../../x"):
        resp = client.post("/v1/completions", json={"model": model, "prompt": "x"})
        assert resp.status_code in (400, 404)
        assert resp.json()["error"]["param"] == "model"
    for path in ("/v1/files/..%2Fsecret.txt", "/v1/files/file-..%2F..%2Fsecret.txt", "/v1/files/file-abc",
                 "/v1/files/..%2f..%2fetc%2fpasswd/content", "/v1/fine_tuning/jobs/ftjob-..%2F..",
                 "/v1/fine_tuning/jobs/..%2Fsecret/events", "/v1/models/..%2F..%2Fsecret"):
        resp = client.get(path)
        assert resp.status_code in (400, 404), path
        assert "top secret" not in resp.text and "error" in resp.json()
    resp = client.get("/v1/files/file-../../secret.txt")  # normalised to /v1/files/secret.txt: a bad id
    assert resp.status_code == 400 and "top secret" not in resp.text
    err = _error(client.get("/v1/files/file-0123/content"), 400)
    assert err["param"] == "file_id"
    job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": "../secret.txt"})
    assert _error(job, 400)["param"] == "training_file"


def test_auth_with_a_key(tunesmith_home):
    app = create_app(ServerConfig(home=tunesmith_home, start_worker=False, api_key="s3cret-key"))
    with TestClient(app) as c:
        err = _error(c.get("/v1/models"), 401)
        assert err["code"] == "invalid_api_key" and "API key" in err["message"]
        assert _error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)["code"] == "invalid_api_key"
        assert _error(c.get("/v1/models", headers={"Authorization": "s3cret-key"}), 401)
        assert _error(c.get("/v1/no-such-route"), 401)  # unknown /v1 routes are not probe-able
        ok = c.get("/v1/models", headers={"Authorization": "Bearer s3cret-key"})
        assert ok.status_code == 200 and any(m["id"] == "tiny-llama" for m in ok.json()["data"])
        page = c.get("/")  # the playground page itself is public; it asks for the key
        assert page.status_code == 200 and 'id="api-key"' in page.text
        assert c.get("/config").json()["auth_required"] is True


def test_body_and_upload_limits(tunesmith_home):
    app = create_app(ServerConfig(home=tunesmith_home, start_worker=False, max_body_bytes=2000,
                                  max_upload_bytes=5000))
    with TestClient(app) as c:
        err = _error(c.post("/v1/completions", json={"model": "tiny-llama", "prompt": "x" * 5000}), 413)
        assert "2,000 bytes" in err["message"]
        big = ("word " * 3000).encode()
        err = _error(c.post("/v1/files", files={"file": ("big.txt", big)}, data={"purpose": "fine-tune"}), 413)
        assert "5,000" in err["message"]
        assert not list((tunesmith_home / "files").glob("*")) if (tunesmith_home / "files").exists() else True
        ok = c.post("/v1/files", files={"file": ("small.txt", TEXT[:3000].encode())}, data={"purpose": "fine-tune"})
        assert ok.status_code == 200, ok.text


def test_files_upload_list_get_content_delete(client, tunesmith_home):
    resp = client.post("/v1/files", files={"file": ("My Book.txt", TEXT.encode())}, data={"purpose": "fine-tune"})
    assert resp.status_code == 200, resp.text
    f = resp.json()
    assert FILE_ID_RE.match(f["id"]) and f["filename"] == "My Book.txt" and f["bytes"] == len(TEXT.encode())
    assert f["object"] == "file" and f["purpose"] == "fine-tune" and f["status"] == "processed"
    stored = tunesmith_home / "files" / f"{f['id']}.txt"
    assert stored.read_text() == TEXT  # kept with its extension, under a generated name
    assert [x["id"] for x in client.get("/v1/files").json()["data"]] == [f["id"]]
    assert client.get(f"/v1/files/{f['id']}").json() == f
    assert client.get(f"/v1/files/{f['id']}/content").text == TEXT
    gone = client.delete(f"/v1/files/{f['id']}").json()
    assert gone == {"id": f["id"], "object": "file", "deleted": True}
    assert not stored.exists()
    assert _error(client.get(f"/v1/files/{f['id']}"), 404)["param"] == "file_id"


def test_bad_upload_names_the_line(client, tunesmith_home):
    bad = b'{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n{"prompt": "e" "completion": 1}\n'
    err = _error(client.post("/v1/files", files={"file": ("data.jsonl", bad)}, data={"purpose": "fine-tune"}), 400)
    assert "data.jsonl" in err["message"] and "line 3" in err["message"] and err["param"] == "file"
    assert ".upload-" not in err["message"]  # our temporary name never leaks
    err = _error(client.post("/v1/files", files={"file": ("notes", b"text")}, data={"purpose": "fine-tune"}), 400)
    assert "extension" in err["message"]
    err = _error(client.post("/v1/files", files={"file": ("a.txt", TEXT.encode())}, data={"purpose": "batch"}), 400)
    assert err["param"] == "purpose"
    assert client.get("/v1/files").json()["data"] == []
    assert not [p for p in (tunesmith_home / "files").iterdir()]  # nothing half-stored


def test_jobs_api_validates_queues_lists_and_cancels(client):
    file_id = client.post("/v1/files", files={"file": ("t.txt", TEXT.encode())}, data={"purpose": "fine-tune"}).json()["id"]
    err = _error(client.post("/v1/fine_tuning/jobs", json={"model": "gpt-4o", "training_file": file_id}), 400)
    assert err["param"] == "model" and "tiny-llama" in err["message"]
    err = _error(client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": "file-" + "0" * 24}), 400)
    assert err["param"] == "training_file"
    err = _error(client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id,
                                                           "hyperparameters": {"n_epochs": 1000}}), 400)
    assert err["param"] == "hyperparameters.n_epochs"
    err = _error(client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id,
                                                           "suffix": "../x"}), 400)
    assert err["param"] == "suffix"
    created = []
    for i in range(3):
        body = {"model": "tiny-llama", "training_file": file_id, "suffix": f"s{i}", "seed": 7,
                "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 1}}}}
        resp = client.post("/v1/fine_tuning/jobs", json=body)
        assert resp.status_code == 200, resp.text
        created.append(resp.json())
    job = created[0]
    assert JOB_ID_RE.match(job["id"]) and job["status"] == "queued" and job["object"] == "fine_tuning.job"
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": 1, "learning_rate_multiplier": 1.0}
    assert job["seed"] == 7 and job["fine_tuned_model"] is None and job["training_file"] == file_id
    page = client.get("/v1/fine_tuning/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == [created[2]["id"], created[1]["id"]] and page["has_more"]
    page2 = client.get("/v1/fine_tuning/jobs", params={"limit": 2, "after": page["data"][-1]["id"]}).json()
    assert [j["id"] for j in page2["data"]] == [job["id"]] and not page2["has_more"]
    # a file a queued job needs cannot be deleted
    assert _error(client.delete(f"/v1/files/{file_id}"), 400)["code"] == "file_in_use"
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"]
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()
    assert [e["message"] for e in events["data"]][0] == "Fine-tuning job cancelled before it started"
    assert events["data"][-1]["message"].startswith("Created fine-tuning job")
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"] == []
    assert _error(client.get("/v1/fine_tuning/jobs/ftjob-" + "a" * 24), 404)["code"] == "job_not_found"


def test_over_capacity_requests_get_429(tunesmith_home):
    app = create_app(ServerConfig(home=tunesmith_home, start_worker=False, max_running=1, max_waiting=1))

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            body = {"model": "tiny-llama", "prompt": "hello", "max_tokens": 8, "temperature": 0}
            return await asyncio.gather(*[c.post("/v1/completions", json=body) for _ in range(5)])

    responses = asyncio.run(main())
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 429, 429, 429], codes
    err = _error(next(r for r in responses if r.status_code == 429), 429)
    assert err["code"] == "rate_limit_exceeded" and "busy" in err["message"]
    assert [b.peak_batch for b in app.state.batching.batchers()] == [1]  # never more than max_running at once
    assert app.state.cache.loads == 1


def test_real_generation_with_tiny_llama(client):
    app = client.app
    body = {"model": "tiny-llama", "prompt": "The harbour at night", "max_tokens": 4, "temperature": 0, "seed": 1}
    first = client.post("/v1/completions", json=body)
    assert first.status_code == 200, first.text
    data = first.json()
    assert data["object"] == "text_completion" and data["id"].startswith("cmpl-")
    choice = data["choices"][0]
    from tunesmith import load

    expected = load("tiny-llama").generate(body["prompt"], max_tokens=4, temperature=0)[0]  # the same greedy text
    assert (choice["text"], choice["finish_reason"]) == (expected.text, expected.finish_reason)
    assert data["usage"]["prompt_tokens"] > 0 and data["usage"]["completion_tokens"] <= 4
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"]
    again = client.post("/v1/completions", json={**body, "echo": True, "logprobs": 2}).json()
    assert again["choices"][0]["text"] == body["prompt"] + choice["text"]  # greedy: same text, echoed
    lp = again["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert lp["text_offset"][0] == len(body["prompt"]) and all(len(t) <= 2 for t in lp["top_logprobs"])
    assert app.state.cache.loads == 1  # the second request reused the loaded model
    two = client.post("/v1/completions", json={**body, "n": 2, "temperature": 1.0}).json()
    assert [c["index"] for c in two["choices"]] == [0, 1]
    # streaming chat: role first, then content deltas, a finish reason, usage, and [DONE]
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4,
            "stream": True, "stream_options": {"include_usage": True}, "seed": 3}
    with client.stream("POST", "/v1/chat/completions", json=chat) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        raw = "".join(resp.iter_text())
    blocks = [b for b in raw.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks) and blocks[-1] == "data: [DONE]"
    chunks = [json.loads(b[6:]) for b in blocks[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert app.state.queue.admitted == 0  # every slot was given back
    models = client.get("/v1/models").json()["data"]
    assert {"tiny-llama", "smollm2-135m"} <= {m["id"] for m in models}
    assert all(re.match(r"^[\w.:+-]+$", m["id"]) for m in models)


def test_dns_rebinding_and_cross_origin_requests_are_refused(tunesmith_home):
    app = create_app(ServerConfig(home=tunesmith_home, start_worker=False,
                                  allowed_hosts=("127.0.0.1", "localhost", "::1")))
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        assert c.get("/v1/models").status_code == 200
        assert c.get("/v1/models", headers={"host": "localhost:8000"}).status_code == 200
        assert c.get("/v1/models", headers={"host": "[::1]:8000"}).status_code == 200
        err = _error(c.get("/v1/models", headers={"host": "evil.example:8000"}), 403)
        assert err["code"] == "forbidden_host"
        assert _error(c.get("/", headers={"host": "evil.example"}), 403)["code"] == "forbidden_host"
        same = c.post("/v1/completions", json={"model": "nope", "prompt": "x"},
                      headers={"origin": "http://127.0.0.1:8000"})
        assert same.status_code == 404  # same origin: reaches the API
        err = _error(c.post("/v1/files", files={"file": ("a.txt", TEXT.encode())}, data={"purpose": "fine-tune"},
                            headers={"origin": "http://evil.example"}), 403)
        assert err["code"] == "cross_origin"
        assert _error(c.get("/v1/models", headers={"origin": "null"}), 403)["code"] == "cross_origin"
        assert not (tunesmith_home / "files").exists() or not list((tunesmith_home / "files").iterdir())


def test_finished_run_directories_are_listed_as_models(client, tunesmith_home):
    run = tunesmith_home / "runs" / "my-sonnets"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"tunesmith_run": 1, "base": "tiny-llama"}))
    (run / "status.json").write_text(json.dumps({"status": "succeeded"}))
    unfinished = tunesmith_home / "runs" / "half-done"
    unfinished.mkdir()
    (unfinished / "config.json").write_text(json.dumps({"tunesmith_run": 1, "base": "tiny-llama"}))
    (unfinished / "status.json").write_text(json.dumps({"status": "interrupted"}))
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["my-sonnets"]["owned_by"] == "user" and "half-done" not in models
    assert models["tiny-llama"]["owned_by"] == "tunesmith"
    assert client.get("/v1/models/my-sonnets").json()["id"] == "my-sonnets"
    assert _error(client.get("/v1/models/half-done"), 404)["code"] == "model_not_found"


def test_prompt_token_ids_must_be_in_the_vocabulary(client, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    vocab = len(tok)
    for ids, bad, position in (([-1], -1, 0), ([2**40], 2**40, 0), ([vocab], vocab, 0), ([5, 6, vocab + 7], vocab + 7, 2)):
        err = _error(client.post("/v1/completions", json={"model": "tiny-llama", "prompt": ids, "max_tokens": 1}), 400)
        assert err["param"] == "prompt" and err["code"] == "invalid_value"
        assert f"token id {bad} at position {position}" in err["message"] and f"0 to {vocab - 1}" in err["message"]
    assert client.app.state.queue.admitted == 0  # the refused requests gave their slots back
    ids = tok.encode("The harbour at night", add_special_tokens=False)
    ok = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": ids + [vocab - 1], "max_tokens": 1,
                                              "echo": True, "temperature": 0})
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["text"].startswith("The harbour at night" + tok.decode([vocab - 1]))


def test_logit_bias_is_applied_and_checked(client):
    """OpenAI's logit_bias: token ids as JSON keys; +100 makes every token that one (chat too, and
    while streaming); a key that is no token id, an id outside the vocabulary or a bias outside
    -100..100 is a 400 naming logit_bias, and gives its slot back."""
    from tunesmith import load

    tok = load("tiny-llama").tokenizer
    body = {"model": "tiny-llama", "prompt": "The harbour", "max_tokens": 4, "temperature": 1.0, "seed": 5,
            "logit_bias": {"42": 100}}
    data = client.post("/v1/completions", json=body)
    assert data.status_code == 200, data.text
    assert data.json()["choices"][0]["text"] == tok.decode([42] * 4)
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
            "logit_bias": {"42": 100}, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=chat) as resp:
        raw = "".join(resp.iter_text())
    deltas = [json.loads(b[6:]) for b in raw.split("\n\n") if b.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in deltas if c["choices"]) == tok.decode([42] * 3)
    for bias, words in (({"x": 1}, "not a token id"), ({"999999": 1}, "token id 999999"), ({"3": 101}, "between -100 and 100")):
        err = _error(client.post("/v1/completions", json={**body, "logit_bias": bias}), 400)
        assert err["param"] == "logit_bias" and words in err["message"], err
    assert client.app.state.queue.admitted == 0


def test_an_empty_body_says_what_is_missing(client):
    for route, needed in (("/v1/completions", ["'model'"]), ("/v1/chat/completions", ["'model'", "'messages'"]),
                          ("/v1/fine_tuning/jobs", ["'model'", "'training_file'"])):
        err = _error(client.post(route, content=b"", headers={"content-type": "application/json"}), 400)
        assert err["code"] == "missing_required_parameter" and "None" not in err["message"]
        assert "request body is missing" in err["message"] and all(n in err["message"] for n in needed), err


def test_checkpoint_ids_are_served_as_models(client, tunesmith_home):
    """Each fine_tuned_model_checkpoint id that /checkpoints lists answers as a model with that
    checkpoint's weights: the same as a run directory holding those weights as its adapter."""
    import shutil

    from test_server_live import story

    from tunesmith.server.store import Store
    from tunesmith.server.worker import JobRunner

    file_id = client.post("/v1/files", files={"file": ("s.txt", story(6).encode())},
                          data={"purpose": "fine-tune"}).json()["id"]
    hp = {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 20}  # one step per epoch, big steps
    job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id, "suffix": "ck",
                                                    "seed": 1, "hyperparameters": hp}).json()
    store = Store(tunesmith_home)
    claimed = store.claim_next_job(pid=1)
    assert JobRunner(store, claimed, threading.Event()).run() == "succeeded"
    tuned = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["fine_tuned_model"]
    listed = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    ids = {c["step_number"]: c["fine_tuned_model_checkpoint"] for c in listed}
    assert ids == {s: f"{tuned}:ckpt-step-{s}" for s in (1, 2)}

    # a reference: a finished run directory whose adapter is step 1's, served by its name
    run_dir = tunesmith_home / "runs" / job["id"]
    ref = tunesmith_home / "runs" / "ref-step-1"
    shutil.copytree(run_dir, ref)
    shutil.rmtree(ref / "adapter")
    shutil.copytree(run_dir / "checkpoints" / "step-000001" / "adapter", ref / "adapter")

    def logprobs(model: str) -> list[float]:
        body = {"model": model, "prompt": "The quiet river", "max_tokens": 4, "temperature": 0, "logprobs": 1}
        resp = client.post("/v1/completions", json=body)
        assert resp.status_code == 200, resp.text
        assert resp.json()["model"] == model
        return resp.json()["choices"][0]["logprobs"]["token_logprobs"]

    assert logprobs(ids[2]) == logprobs(tuned)  # the last checkpoint is the final adapter
    assert logprobs(ids[1]) == logprobs("ref-step-1")
    assert logprobs(ids[1]) != logprobs(ids[2])
    shown = client.get(f"/v1/models/{ids[1]}").json()
    assert shown["id"] == ids[1] and shown["kind"] == "checkpoint" and shown["job"] == job["id"]
    # a run keeps only its latest checkpoints: one that was pruned says so (even when it was loaded before)
    shutil.rmtree(run_dir / "checkpoints" / "step-000001")
    err = _error(client.post("/v1/completions", json={"model": ids[1], "prompt": "x", "max_tokens": 1}), 404)
    assert err["code"] == "model_not_found" and "no longer keeps its checkpoint at step 1" in err["message"]
    err = _error(client.post("/v1/completions", json={"model": f"{tuned}:ckpt-step-9", "prompt": "x"}), 404)
    assert err["param"] == "model"
    other = "ft:tiny-llama:zz:" + job["id"] + ":ckpt-step-2"  # the right job and step under another name
    assert _error(client.get(f"/v1/models/{other}"), 404)["code"] == "model_not_found"


# --- copied spans in the tunesmith extension field ---------------------------------------------


class CopyingModel:
    """Stands in for a fine-tuned model whose every generation is the same text."""

    context_length = 2048
    tokenizer = None

    def __init__(self, text: str):
        self.text = text

    def count_tokens(self, text):
        return len(text.split())

    def chat_prompt(self, messages):
        return messages[-1]["content"]



class CopyingBatch:
    """Stands in for the decoding loops: every choice writes the model's one text, word by word."""

    def arrival(self):
        from tunesmith.server.batching import Arrival, Batching

        return Arrival(Batching(None, 1))

    async def events(self, model, prompt, sampling, *, n=1, logprobs=None, stream=False, arrival=None):
        from tunesmith.batching import Event
        from tunesmith.generate import Chunk, Completion

        if arrival is not None:
            arrival.done()

        words = model.text.split(" ")
        for index in range(n):
            for i, word in enumerate(words):
                last = i == len(words) - 1
                if stream:
                    yield Event("chunk", index, chunk=Chunk(word if last else word + " ", "length" if last else None,
                                                             len(words) if last else 0))
            yield Event("done", index, completion=Completion(text=model.text, finish_reason="length", prompt_tokens=1,
                                                             completion_tokens=len(words)))


def book_run(home, prepared, name: str = "sherlock-run"):
    """A finished run under ``home/runs`` whose training text is the prepared book."""
    import shutil

    run = home / "runs" / name
    (run / "data").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"tunesmith_run": 1, "base": "tiny-llama"}))
    (run / "status.json").write_text(json.dumps({"status": "succeeded"}))
    for file in ("train.jsonl", "report.json"):
        shutil.copy(prepared / file, run / "data" / file)
    return run


def _sse_chunks(client, route: str, body: dict) -> list[dict]:
    with client.stream("POST", route, json=body) as resp:
        assert resp.status_code == 200, resp.read()
        raw = "".join(resp.iter_text())
    blocks = [b for b in raw.split("\n\n") if b]
    assert blocks[-1] == "data: [DONE]"
    return [json.loads(b[6:]) for b in blocks[:-1]]


@pytest.fixture()
def copying_client(tunesmith_home, sherlock):  # noqa: F811 - the fixture imported above
    from test_copies import OWN, SWANDAM

    flat = " ".join(SWANDAM.split())
    text = f"{OWN[0]} {flat} {OWN[1]}"
    book_run(tunesmith_home, sherlock)
    cache = ModelCache(loader=lambda source: CopyingModel(text), sizer=lambda m: 1)
    app = create_app(ServerConfig(home=tunesmith_home, start_worker=False, model_cache=cache))
    app.state.generator.batching = CopyingBatch()
    with TestClient(app) as c:
        yield c, text, flat


def test_copied_spans_come_back_in_the_tunesmith_field(copying_client):
    from test_copies import OWN

    client, text, flat = copying_client
    check = {"check_copying": True}
    body = {"model": "sherlock-run", "prompt": "Once", "max_tokens": 50, "tunesmith": check}
    data = client.post("/v1/completions", json=body).json()
    choice = data["choices"][0]
    assert choice["text"] == text
    copying = choice["tunesmith"]["copying"]
    (span,) = copying["spans"]
    assert span["text"] == flat and choice["text"][span["start"]:span["end"]] == flat
    assert span["start"] == len(OWN[0]) + 1 and span["n_words"] == len(flat.split()) and span["count"] == 1
    where = span["locations"][0]
    # read off sherlock.txt by hand (test_copies.PLANTED)
    assert (where["file"], where["line"], where["end_line"]) == ("sherlock.txt", 5205, 5209)
    assert where["heading"] == "ADVENTURE VI. THE MAN WITH THE TWISTED LIP"
    assert copying["longest"] == span and copying["min_tokens"] == 12
    share = span["n_tokens"] / copying["n_tokens"]  # one span: the copy rate is its share of the tokens
    assert copying["copy_rate"] == pytest.approx(share) and 0.4 < share < 0.9
    assert set(copying["novelty"]) == {"4", "8", "16", "32"} and 0 < copying["novelty"]["32"] < 1

    # without the option there is no extension field; with echo the offsets count the prompt too
    assert "tunesmith" not in client.post("/v1/completions", json={**body, "tunesmith": None}).json()["choices"][0]
    echoed = client.post("/v1/completions", json={**body, "echo": True}).json()["choices"][0]
    (span,) = echoed["tunesmith"]["copying"]["spans"]
    assert echoed["text"].startswith("Once") and echoed["text"][span["start"]:span["end"]] == flat
    # a higher threshold than the span: nothing counts as copied
    none = client.post("/v1/completions", json={**body, "tunesmith": {**check, "min_tokens": 500}}).json()
    assert none["choices"][0]["tunesmith"]["copying"]["spans"] == []
    assert none["choices"][0]["tunesmith"]["copying"]["copy_rate"] == 0

    # chat: each choice's copies in the message's choice
    chat = {"model": "sherlock-run", "messages": [{"role": "user", "content": "Tell me"}], "n": 2, "tunesmith": check}
    choices = client.post("/v1/chat/completions", json=chat).json()["choices"]
    assert [c["tunesmith"]["copying"]["spans"][0]["text"] for c in choices] == [flat, flat]
    assert client.app.state.copies.opens == 1  # one index, opened once for all these requests


def test_streamed_copies_come_in_the_last_chunk_of_each_choice(copying_client):
    client, text, flat = copying_client
    chat = {"model": "sherlock-run", "messages": [{"role": "user", "content": "Tell me"}], "n": 2, "stream": True,
            "tunesmith": {"check_copying": True}}
    chunks = _sse_chunks(client, "/v1/chat/completions", chat)
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        content = "".join(c["delta"].get("content", "") for c in mine)
        assert content == text
        assert [("tunesmith" in c) for c in mine] == [False] * (len(mine) - 1) + [True]
        assert mine[-1]["finish_reason"] == "length"
        (span,) = mine[-1]["tunesmith"]["copying"]["spans"]
        assert content[span["start"]:span["end"]] == flat
    body = {"model": "sherlock-run", "prompt": "Once", "max_tokens": 50, "stream": True, "echo": True,
            "tunesmith": {"check_copying": True}}
    pieces = [c["choices"][0] for c in _sse_chunks(client, "/v1/completions", body)]
    whole = "".join(p["text"] for p in pieces)
    (span,) = pieces[-1]["tunesmith"]["copying"]["spans"]
    assert whole == "Once" + text and whole[span["start"]:span["end"]] == flat
    assert client.app.state.queue.admitted == 0


def test_checking_copies_needs_a_model_with_training_text(copying_client, tunesmith_home):
    client, _, _ = copying_client
    body = {"model": "tiny-llama", "prompt": "Once", "max_tokens": 2, "tunesmith": {"check_copying": True}}
    err = _error(client.post("/v1/completions", json=body), 400)
    assert err["param"] == "tunesmith.check_copying" and "'tiny-llama' is a base model" in err["message"]
    err = _error(client.post("/v1/completions", json={**body, "tunesmith": {"check_copyng": True}}), 400)
    assert err["param"] == "tunesmith.check_copyng"
    err = _error(client.post("/v1/completions", json={**body, "tunesmith": {"check_copying": True, "min_tokens": 0}}), 400)
    assert err["param"] == "tunesmith.min_tokens"
    (tunesmith_home / "runs" / "sherlock-run" / "data" / "train.jsonl").unlink()  # a run without its data
    err = _error(client.post("/v1/completions", json={**body, "model": "sherlock-run"}), 400)
    assert err["param"] == "tunesmith.check_copying" and "data/train.jsonl" in err["message"]
    assert client.app.state.queue.admitted == 0
