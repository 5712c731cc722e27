"""Quantization tests run many small tensor ops; on a busy 2-core machine OpenMP's default spin-waiting makes
them several times slower. This only takes effect when torch is not imported yet (e.g. `pytest tests/quantization`)."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
