"""Lantern serving package.

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
