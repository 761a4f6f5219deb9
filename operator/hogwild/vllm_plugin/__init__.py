"""The vLLM side of hogwild, installed through vLLM's own plugin entry points (no fork).

- `general`: a `vllm.general_plugins` entry point, loaded in every vLLM process; on CPU it applies the one
  patch of vLLM internals (see `compat`).
- `extension`: the `--worker-extension-cls` mixed into vLLM's worker; exports the weight handles.
- `endpoint`: a `vllm.endpoint_plugins` entry point adding /train, /checkpoint, /train/status, ... routes.
- `launch`: `hogwild vllm`, which picks the newest checkpoint and starts vLLM's OpenAI server with all that.
"""
