"""gptfast's benchmark harness: `pytest bench --benchmark-only`."""
