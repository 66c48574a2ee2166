"""Lantern serving package.

Importing it (before torch) caps how long torch's OpenMP threads spin after each parallel region. GNU OpenMP's default
(300,000 spins, milliseconds) kept both of torch's threads busy after every image's normalisation, taking the cores
ONNX Runtime then ran the model on: one resnet50 image on 2 cores took 28 ms decoded, preprocessed and run, against
18.5 ms for the run alone and 0.5 ms for the rest. With 10,000 spins it takes 20 ms, and explanations' many small
tensor operations run as fast as before (OMP_WAIT_POLICY=PASSIVE, no spinning at all, made those 4x slower). The
environment is read when torch loads OpenMP, so it applies to the processes that import this package first (the
server's workers: `lantern serve` and `bentoml serve` both do) and to those they start; a value already set wins."""

import os
import sys

OPENMP_SPIN_COUNT = "10000"

if "torch" not in sys.modules:
    os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)
