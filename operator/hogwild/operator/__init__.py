"""The TrainingSession operator (kopf).

Pure layers: `spec` (parse, default and validate a CR spec), `pod_builder` (the pod), `builders` (its
neighbours and the names they share), `diff` (hot vs restart-requiring changes), `status` (phase and
conditions from observed facts).
Thin side-effect layers: `kube` (API calls), `relay` (ZMQ to the worker), `metrics`, and `reconcile` +
`handlers`, which wire the pure functions to them. `main` is `hogwild operator`.
"""
