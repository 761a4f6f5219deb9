"""The training worker: maps vLLM's weights zero-copy and trains them in place, beside serving.

- `model`: rebuild the exported tensors and build the Hugging Face module over them, as views.
- `batches`: samples -> padded token batches (pure).
- `trainer`: the in-place training step, hot reconfiguration, optimizer state.
- `service`: the worker's state (mapping, watcher, jobs, checkpoints) behind the protocol's five messages.
- `protection`: preemption points that yield to serving; `serving_load`: how busy the server is (the
  load-hint file the vLLM plugin writes, or vLLM's metrics).
- `server`: the thin ZMQ server; `metrics`: Prometheus; `main`: `hogwild worker`.
"""
