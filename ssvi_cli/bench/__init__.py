"""``ssvi bench``: training steps, Monte Carlo prediction and memory, measured side by side.

Everything runs in one process on the same synthetic minibatch and seed. Within every repeat each
variant is timed once, in an order rotated from repeat to repeat, so that the load of a shared machine
hits every variant alike; medians over the repeats (warm-up excluded) and ratios against dense VI
(training) or the dense BNN file (prediction) are reported. The inputs are random tensors of the
model's input shape: timing and memory do not depend on the data, accuracy is not measured here.

Training variants: ``dense`` (deterministic), ``vi`` (dense VI) and ``ssvi`` at every sparsity with
each kernel (``sparse``, ``dense``, ``auto``); their parameter steps are timed (the common case), and
separately an SSVI subspace step (dense-gradient capture plus remove-and-add), from which the
amortised cost per step at the recipe's ``delta_t`` is reported. Prediction: the SSVI model is written
as a compact file and as a dense BNN file (``--dense``), both are read back with ``read_model_file``
and timed with the same Monte Carlo prediction.

The models are the registered bench models (:data:`BENCH_MODELS`) and ``torchvision:NAME``, any of
torchvision's classifiers built as ``ssvi train --model torchvision:NAME`` builds it (see
:func:`bench_model`).
"""

from ssvi_cli.bench.models import BENCH_MODELS, KERNELS, BenchModel, BenchOptions, bench_model, check_input
from ssvi_cli.bench.run import result_options, run_bench

__all__ = ["BENCH_MODELS", "KERNELS", "BenchModel", "BenchOptions", "bench_model", "check_input", "result_options", "run_bench"]
