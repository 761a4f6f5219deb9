"""The training worker: maps vLLM's weights zero-copy and trains them in place, beside serving.

- `model`: rebuild the exported tensors and build the Hugging Face module over them, as views.
- `batches`: samples -> padded token batches (pure).
- `trainer`: the in-place training step, hot reconfiguration, optimizer state.
- `service`: the worker's state (mapping, watcher, jobs, checkpoints) behind the protocol's five messages.
- `protection` (a package): serving protection, preemption points that yield to serving while it is busy
  (the load-hint file the vLLM plugin writes, `hogwild.load_hint`, or vLLM's metrics), keeping a guaranteed
  share of the trainer's time.
- `server`: the thin ZMQ server; `metrics`: Prometheus; `main`: `hogwild worker`.
"""
