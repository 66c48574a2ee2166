"""Lantern serving package: the endpoint (see README.md and ../shared/DESIGN.md).

Glossary: the types that name a deployment or a model, from the configuration to the running worker.
- `DeploymentConfig` (config.py): a deployment as endpoint.yaml and the management API write it (name, model URI,
  settings overrides, device, backend, batching, request settings, probes).
- `DeploymentRecord` (state.py): a deployment in the persisted endpoint state: its config, its generation (raised by
  every update) and the version its model URI was resolved to.
- `DeploymentInstance` (instance.py): one generation of a deployment in one worker: its `Deployment`, admission,
  probes and batcher; an update readies a new instance beside the serving one.
- `Deployment` (deployment.py): loads a version, warms it up and serves it: state (loading, ready, unready, failed),
  pre- and post-processing, predictions and explanations.
- `LoadedModel` (deployment.py): what a ready `Deployment` serves with: the bundle, the settings in force (the
  version's with the overrides), the preprocessing, the predictor, the device explanations run on.
- `ModelCore` (shared_models.py): a loaded model shared by the deployments of one version on one backend and device:
  bundle, predictor, the guided methods' copy of the module, and who uses it.
- `ModelBundle` (registry/resolve.py): a registered version loaded from its files: nn.Module, ONNX file, labels,
  settings, spec; `DownloadedVersion` is its files on disk.
- `InstanceStatus` (workers.py): one deployment as one worker reports it (generation, state, version, backend, the
  next generation's state), published on the workers' status board.
- `DeploymentView` (control.py): one deployment as the whole endpoint serves it, for the management API: its state
  over every worker, traffic, mirror, settings, labels, counters.

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
