"""The inference side: a Llama-style decoder in Paddle that runs through ``kernels`` (``model.py``), its named
sizes (``config.py``, importable without Paddle), byte tokenizer and seeded generation."""
