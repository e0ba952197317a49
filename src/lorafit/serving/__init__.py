"""`lorafit serve`: one base model, many LoRA adapters, an OpenAI-compatible API (see server.py)."""
