"""``osum-serve``: an HTTP API over a torch package with dynamic batching (FastAPI + uvicorn; no JAX)."""
