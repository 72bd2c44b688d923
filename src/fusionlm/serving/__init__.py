"""``fusionlm serve``: an OpenAI-compatible server with continuous batching.

protocol.py (OpenAI's request models, responses and errors), engine.py (the thread that owns
the model, its per-row KV cache and the scheduler), metrics.py (Prometheus), app.py (the
ASGI routes), server.py (the process: uvicorn, and the drain on SIGTERM).
"""
