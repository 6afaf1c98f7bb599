"""``tunesmith serve``: an OpenAI-compatible HTTP API, durable fine-tuning jobs and a web playground.

- ``app.create_app(ServerConfig(...))``: the FastAPI app (routes under /v1, the playground at /),
  assembled from guard, errors, routes/ and the shared state (docs/ARCHITECTURE.md, "The server").
- ``store.Store``: SQLite (WAL) state at ``$TUNESMITH_HOME/tunesmith.db``: files, jobs, events, checkpoints.
- ``supervisor`` and ``worker``: the training worker process (one per ``$TUNESMITH_HOME``, FIFO).
- ``models_cache.ModelCache``: loaded models, least recently used first out, under a memory budget.
- ``commands``: ``serve_command`` and ``jobs_app`` for the Typer CLI.

Importing this package imports nothing heavy.
"""
