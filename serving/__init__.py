"""Lantern serving package: the endpoint (README.md "Layout" shows its four packages: http/, runtime/, control/,
client/).

Glossary: the types that name a deployment or a model, from the configuration to the running worker.
- `DeploymentConfig` (config.py): a deployment as endpoint.yaml and the management API write it (name, model URI,
  settings overrides, device, backend, batching, request settings, probes).
- `DeploymentRecord` (control/state.py): a deployment in the persisted endpoint state: its config, its generation
  (raised by every update) and the version its model URI was resolved to.
- `DeploymentInstance` (runtime/instance.py): one generation of a deployment in one worker: its `Deployment`, admission,
  probes and batcher; an update readies a new instance beside the serving one.
- `Deployment` (runtime/deployment.py): loads a version, warms it up and serves it: state (loading, ready, unready,
  failed), pre- and post-processing, predictions and explanations.
- `LoadedModel` (runtime/deployment.py): what a ready `Deployment` serves with: the bundle, the settings in force (the
  version's with the overrides), the preprocessing, the predictor, the device explanations run on.
- `ModelCore` (runtime/shared_models.py): a loaded model shared by the deployments of one version on one backend and
  device: bundle, predictor, the guided methods' copy of the module, and who uses it.
- `ModelBundle` (registry/resolve.py): a registered version loaded from its files: nn.Module, ONNX file, labels,
  settings, spec; `DownloadedVersion` is its files on disk.
- `InstanceStatus` (control/workers.py): one deployment as one worker reports it (generation, state, version, backend,
  the next generation's state), published on the workers' status board.
- `DeploymentView` (control/control.py): one deployment as the whole endpoint serves it, for the management API: its
  state over every worker, traffic, mirror, settings, labels, counters.
- `ServedModel` (control/control.py): what one generation serves in this worker (settings, labels), as the runtime hands
  it to the management views.
- `Route` (runtime/routing.py): where one request goes: the instance that answers it and the one that gets a mirrored
  copy.

Importing it (before torch) caps how long torch's OpenMP threads spin after each parallel region: GNU OpenMP's default
(milliseconds of spinning) keeps torch's threads busy after every image's normalisation, on the cores ONNX Runtime
then runs the model on. A short spin keeps explanations' many small tensor operations fast, where no spinning at all
(OMP_WAIT_POLICY=PASSIVE) slows them down (bench/README.md has the figures). The environment is read when torch loads
OpenMP, so it applies to the processes that import this package first (the server's workers: `lantern serve` and
`bentoml serve` both do) and to those they start; a value already set wins."""

import os
import sys

OPENMP_SPIN_COUNT = "10000"

if "torch" not in sys.modules:
    os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)
