"""One worker's data plane, with no knowledge of HTTP: the endpoint following the persisted state, routing,
preparing images, batching, the backends (ONNX Runtime, torch), explanations, admission and metrics. It raises the
domain errors of errors.py; `serving.http` answers them."""
