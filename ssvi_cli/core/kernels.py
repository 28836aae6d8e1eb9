"""Products of a sparse weight with dense inputs, and the policy that picks a kernel per layer.

A support viewed as a (rows, cols) matrix gives a CSR pattern (:class:`CsrPattern`); the weight's
values over it multiply inputs through :class:`SparseMatmul` (gradients only for the stored
entries) or, without gradients, :func:`csr_product` directly. A :class:`KernelPolicy` decides per
layer whether the sparse product or a transient dense weight runs; it is given to a layer when the
layer is built (``models.LayerFactory``), and switched on a model from outside only for a block by
``core.modes.using_kernel``, which restores it (infer's prediction kernel, the FLOP count's probe).
"""

from __future__ import annotations

import functools
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ssvi_cli.registry import Registry

# CSR support is stable for the operations used here (matmul, sampled_addmm); the warning is noise.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state", module=r"ssvi_cli\.")  # ours alone

# Linear (and 1x1 conv) layers at or below this density use the sparse (CSR) kernel under
# ``kernel=auto``. Calibrated with a 1024x1024 LRT layer, forward + backward, batch 64 and 256, one
# thread (MKL CSR vs dense GEMM, interleaved medians): sparse/dense time = 0.41-0.47 at density 0.05,
# 0.70-0.78 at 0.1, 0.83-0.85 at 0.15, 1.0-1.05 at 0.2 and 0.95-1.41 at 0.3. The cut sits below the
# break-even point so that ``auto`` never loses to ``dense`` by more than noise.
AUTO_SPARSE_MAX_DENSITY = 0.12

# A CSR weight times a dense input has two CPU kernels: MKL's CSR product, and ``embedding_bag`` (FBGEMM
# on x86), which sums, for every output row, the input rows of its active columns weighted by the
# entries: the same sums. With the input transposed as the bag's table, embedding_bag was 1.1-1.5x
# faster while that table fitted in half of the L2 cache and the batch had 32 rows or more, and up to
# 2x slower with larger tables (AVX-512 Xeon, 2 MiB L2; 1024x784 to 2048x2048 and 256x4096 weights at
# density 0.05-0.1, batches 32-768, 1 and 2 threads). On AMD's CPUs MKL's CSR product is the slower one
# at every table size: embedding_bag took 0.42-0.52x its time from 32 rows up, tables of 256 KiB to
# 12 MiB (AMD EPYC Zen 3, AVX2, 512 KiB L2; the same shapes, 2 threads). Outside those bounds the CSR
# kernel runs.
BAG_MIN_ROWS = 32
NO_LIMIT = 2**62


@functools.lru_cache(maxsize=None)
def bag_table_limit() -> int:
    """Bytes of transposed input up to which the ``embedding_bag`` kernel is used: on x86 with AVX2 or
    AVX-512, no limit on an AMD CPU, else half of CPU 0's L2 cache; elsewhere 0 (never: not measured)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or \
            torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return 0
    return NO_LIMIT if cpu_vendor() == "AuthenticAMD" else l2_cache_bytes() // 2


def cpu_vendor(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's vendor as Linux names it (``GenuineIntel``, ``AuthenticAMD``); "" where not readable."""
    try:
        with cpuinfo.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


def l2_cache_bytes(cache_dir: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """CPU 0's level-2 data (or unified) cache in bytes from Linux sysfs; 0 where not readable."""
    for index in sorted(cache_dir.glob("index*")):
        try:
            level, kind, size = ((index / name).read_text().strip() for name in ("level", "type", "size"))
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20}.get(size[-1:].upper(), 0)
        if level == "2" and kind in ("Unified", "Data") and size[:-1].isdigit():
            return int(size[:-1]) * scale
    return 0


# ------------------------------------------------------------------ kernel policies

class _Weighted(Protocol):
    active: int
    numel: int

    @property
    def density(self) -> float: ...

    def default_sparse(self) -> bool: ...

    def is_linear(self) -> bool: ...


@dataclass(frozen=True)
class KernelPolicy:
    """Which product a layer runs: ``sparse`` (stored entries only), ``dense`` (a transient dense
    weight), ``auto`` (sparse for linear and 1x1 conv layers at density <= AUTO_SPARSE_MAX_DENSITY)
    or ``prediction`` (linear layers always sparse, convolutions as ``auto``; what a loaded model
    predicts with, so no dense linear weight is ever built)."""

    name: str

    def use_sparse(self, layer: _Weighted) -> bool:
        if layer.active == layer.numel or self.name == "dense":
            return False
        if self.name == "sparse" or (self.name == "prediction" and layer.is_linear()):
            return True
        return layer.default_sparse() and layer.density <= AUTO_SPARSE_MAX_DENSITY


KERNELS: Registry[KernelPolicy] = Registry("kernel")
for _name in ("auto", "sparse", "dense", "prediction"):
    KERNELS.register(_name)(KernelPolicy(_name))


# ------------------------------------------------------------------ sparse kernel

@dataclass
class CsrPattern:
    """CSR structure of a support viewed as a (rows, cols) matrix, and of its transpose."""

    rows: int
    cols: int
    crow: Tensor
    col: Tensor
    crow_t: Tensor
    col_t: Tensor
    perm_t: Tensor  # values[perm_t] lists the entries in the transpose's CSR order

    @classmethod
    def from_flat(cls, idx: Tensor, rows: int, cols: int) -> "CsrPattern":
        r, c = idx // cols, idx % cols  # idx is sorted, so (r, c) is already in CSR order
        perm_t = torch.argsort(c * rows + r)
        # MKL's CSR kernels take 32-bit indices and would convert 64-bit ones on every product.
        small = max(rows, cols, idx.numel()) < 2**31
        index = (lambda t: t.to(torch.int32)) if small else (lambda t: t)
        crow = torch.ops.aten._convert_indices_from_coo_to_csr(r, rows, out_int32=small)
        crow_t = torch.ops.aten._convert_indices_from_coo_to_csr(c[perm_t], cols, out_int32=small)
        return cls(rows, cols, crow, index(c), crow_t, index(r[perm_t]), perm_t)

    def matrix(self, values: Tensor) -> Tensor:
        return torch.sparse_csr_tensor(self.crow, self.col, values, (self.rows, self.cols),
                                       check_invariants=False)

    def matrix_t(self, values: Tensor) -> Tensor:
        return torch.sparse_csr_tensor(self.crow_t, self.col_t, values[self.perm_t],
                                       (self.cols, self.rows), check_invariants=False)


class SparseMatmul:
    """``x @ W.T (+ bias)`` for a CSR weight given by its values; gradients only for the stored entries.

    forward: out = (W x^T + bias)^T; backward: dx = (W^T g^T)^T, dvalues = (g^T x) sampled on the
    support, dbias = sum of g over rows. ``bias`` is optional (``apply(x, values, pattern)``).
    """

    @staticmethod
    def apply(x: Tensor, values: Tensor, pattern: CsrPattern, bias: Optional[Tensor] = None) -> Tensor:
        # The function gives the kernel's (out, rows) matrix and the transpose is taken here, outside
        # it: a view made inside a custom function may not be changed in place, as an inplace ReLU
        # after the layer does.
        return _TransposedProduct.apply(x, values, pattern, *(() if bias is None else (bias,))).t()


class _TransposedProduct(torch.autograd.Function):
    """(W x^T + bias), the (out, rows) matrix :class:`SparseMatmul` returns transposed."""

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, pattern: CsrPattern,  # type: ignore[override]
                bias: Optional[Tensor] = None) -> Tensor:
        ctx.save_for_backward(x, values)
        ctx.pattern = pattern
        return _out_by_rows(x, pattern.matrix(values), bias)  # the kernel's own tensor, not a view

    @staticmethod
    def backward(ctx, grad_t: Tensor):  # type: ignore[override]
        grad = grad_t.t()  # (rows, out), as x @ W.T
        x, values = ctx.saved_tensors
        p: CsrPattern = ctx.pattern
        needs = ctx.needs_input_grad
        grad_x = grad_values = grad_bias = None
        if needs[0]:
            grad_x = csr_product(grad, p.matrix_t(values))
        if needs[1]:
            sampled = torch.sparse.sampled_addmm(
                p.matrix(torch.zeros_like(values)), grad.t().contiguous(), x.contiguous(), beta=0.0
            )
            grad_values = sampled.values()
        if len(needs) > 3 and needs[3]:
            grad_bias = grad.sum(0)
        return (grad_x, grad_values, None, grad_bias)[:len(needs)]


def csr_product(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, out: Optional[Tensor] = None
                ) -> Tensor:
    """``x @ weight.T (+ bias)`` for a CSR ``weight``: the forward computation of :class:`SparseMatmul`.

    Two kernels compute the same sums over the stored entries: ``embedding_bag`` where it is faster
    (see :data:`BAG_MIN_ROWS`), else MKL's CSR product. The result is the kernel's (out, rows) matrix
    viewed transposed, so feeding it to the next product needs no copy. The CSR kernel writes into
    ``out`` when given (no autograd) and fuses the bias into the product (``addmm`` with it as the
    initial output, faster than a zero-filled product and a separate addition); ``embedding_bag``
    allocates its result and adds the bias after.
    """
    return _out_by_rows(x, weight, bias, out).t()


def _out_by_rows(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Tensor:
    """``weight @ x.T (+ bias)``, the (out, rows) matrix the kernels write: :func:`csr_product`."""
    xt = x.t().contiguous()
    if (xt.device.type == "cpu" and xt.shape[1] >= BAG_MIN_ROWS
            and xt.numel() * xt.element_size() <= bag_table_limit()):
        sums = F.embedding_bag(weight.col_indices(), xt, weight.crow_indices(), mode="sum",
                               per_sample_weights=weight.values(), include_last_offset=True)
        return sums if bias is None else sums.add_(bias[:, None])
    if bias is None:
        return torch.mm(weight, xt, out=out)
    return torch.addmm(bias[:, None].expand(weight.shape[0], xt.shape[1]), weight, xt, out=out)


def sparse_product(x: Tensor, values: Tensor, pattern: CsrPattern, bias: Optional[Tensor] = None) -> Tensor:
    """:class:`SparseMatmul` in float32 even under autocast (float64 for float64 inputs): the CSR
    kernels have no half types.

    Without gradients (prediction) the kernel is called directly, skipping autograd's bookkeeping.
    """
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return _sparse_product(x, values, pattern, bias)
    return _sparse_product(x, values, pattern, bias)  # entering the context costs ~10 us a call


def _sparse_product(x: Tensor, values: Tensor, pattern: CsrPattern, bias: Optional[Tensor]) -> Tensor:
    work = torch.float64 if x.dtype == torch.float64 else torch.float32  # no half-precision CSR kernels
    x, values = x.to(work), values.to(work)
    bias = None if bias is None else bias.to(work)
    tracked = (x, values) if bias is None else (x, values, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tracked):
        return SparseMatmul.apply(*tracked[:2], pattern, *tracked[2:])
    return csr_product(x, pattern.matrix(values), bias)
