"""``nn.MultiheadAttention`` with every projection a child layer, so that :func:`ssvi_cli.sparsify`
converts them as it converts any ``nn.Linear``: torch's module holds its packed in-projection as a
parameter of its own and reads ``out_proj.weight`` itself, which a sparse layer does not have.

:class:`SplitMultiheadAttention` holds the in-projection split in thirds, ``q_proj``, ``k_proj`` and
``v_proj`` (``nn.Linear``, each a block of rows of ``in_proj_weight``, or torch's separate
``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ), beside ``out_proj``, and computes what
``torch.nn.functional.multi_head_attention_forward`` computes (the same steps, masks and return
values), calling each projection as a module. An attention that cannot be split stays as it is
(:func:`unsplittable` says why: ``add_bias_kv``, a forward of its own, hooks, a tied weight, ...).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssvi_cli.core.carried import hook_kinds, reparametrized
from ssvi_cli.core.replaced import mark_replaced, unmark


def unsplittable(module: nn.MultiheadAttention, model: Optional[nn.Module] = None) -> Optional[str]:
    """Why ``module`` (in ``model``) is kept as it is, its in-projection dense and deterministic (None:
    it is split)."""
    if module.bias_k is not None or module.add_zero_attn:
        return "nn.MultiheadAttention with add_bias_kv or add_zero_attn is not converted"
    if type(module).forward is not nn.MultiheadAttention.forward or "forward" in vars(module):
        return f"{type(module).__name__} computes with a forward of its own, which a split copy would drop"
    if any(reparametrized(m) for m in module.modules()):
        return "nn.MultiheadAttention with a pruned or reparametrized weight, which a split copy would drop"
    if any(hook_kinds(m) for m in module.modules()):
        return "nn.MultiheadAttention with hooks (on it, its out_proj or a weight), which a split copy would not carry"
    if model is not None and _shared_outside(model, module):
        return "nn.MultiheadAttention with a weight another module shares (tied), which a split copy would not share"
    return None


def _shared_outside(model: nn.Module, module: nn.Module) -> bool:
    """Whether a module of ``model`` outside ``module`` holds one of ``module``'s weights."""
    inside, mine = {id(m) for m in module.modules()}, {id(p) for p in module.parameters()}
    return any(id(p) in mine for m in model.modules() if id(m) not in inside for p in m.parameters(recurse=False))


def split_attention(model: nn.Module, wanted: Callable[[str], bool] = lambda name: True) -> Callable[[], None]:
    """Put a :class:`SplitMultiheadAttention` in place of each ``nn.MultiheadAttention`` of ``model``
    that can be split (and whose name ``wanted`` takes), under every name it is registered as, its
    weights marked taken out (``core.replaced``); returns the function that puts the originals back."""
    aliases: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.MultiheadAttention) and name:
            aliases.setdefault(id(module), []).append(name)
    done: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, child name, original)
    for names in aliases.values():
        original = model.get_submodule(names[0])
        if unsplittable(original, model) is not None or not all(wanted(name) for name in names):
            continue
        split = SplitMultiheadAttention.from_module(original)
        mark_replaced(original, names[0])
        mark_replaced(original.out_proj, f"{names[0]}.out_proj")
        for alias in names:
            parent_name, _, child = alias.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            done.append((parent, child, original))
            setattr(parent, child, split)

    # torch's encoder stack takes a padded batch as a nested tensor in eval, a path that reads each
    # layer's packed in-projection: off for a stack holding a split one, and back on with the originals.
    stacks = [m for m in model.modules() if isinstance(m, nn.TransformerEncoder) and m.use_nested_tensor
              and any(isinstance(layer.self_attn, SplitMultiheadAttention) for layer in m.layers)]
    for stack in stacks:
        stack.use_nested_tensor = False

    def undo() -> None:
        for parent, child, original in done:
            setattr(parent, child, original)
        for stack in stacks:
            stack.use_nested_tensor = True
        unmark(m for _, _, original in done for m in (original, original.out_proj))

    return undo


class SplitMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention``'s computation over four projection layers (see the module docstring).
    Its attributes are torch's (``embed_dim``, ``num_heads``, ``batch_first``, ...); ``in_proj_bias`` is
    None and ``_qkv_same_embed_dim`` False, which keep torch's transformer layers off their fused
    inference path (it reads the packed weights)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: Optional[int] = None, vdim: Optional[int] = None, batch_first: bool = False) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.head_dim = embed_dim // num_heads
        self.in_proj_bias = None  # (torch's fast-path checks read these two)
        self._qkv_same_embed_dim = False
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention) -> "SplitMultiheadAttention":
        """The same attention, its weights copied (on their device, in their dtype, frozen if they were)."""
        weight = mha.in_proj_weight if mha._qkv_same_embed_dim else mha.q_proj_weight
        with torch.device("meta"):  # no memory spent on the initialisation the copy overwrites
            split = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.in_proj_bias is not None, mha.kdim, mha.vdim,
                        mha.batch_first)
        split = split.to_empty(device=weight.device).to(weight.dtype)
        e = mha.embed_dim
        weights = (mha.in_proj_weight.detach().split(e) if mha._qkv_same_embed_dim else
                   (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach()))
        sources = (mha.in_proj_weight,) * 3 if mha._qkv_same_embed_dim else \
            (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.detach().split(e) if mha.in_proj_bias is not None else (None,) * 3
        for layer, w, b, source in zip((split.q_proj, split.k_proj, split.v_proj), weights, biases, sources):
            _copy(layer, w, b, source, mha.in_proj_bias)
        _copy(split.out_proj, mha.out_proj.weight.detach(), None if mha.out_proj.bias is None else
              mha.out_proj.bias.detach(), mha.out_proj.weight, mha.out_proj.bias)
        split.train(mha.training)
        return split

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """``nn.MultiheadAttention.forward``'s arguments and results."""
        self._check_shapes(query, key, value, key_padding_mask, attn_mask)
        batched = query.dim() == 3
        if not batched:  # (L, E): one sequence, as a batch of one in (L, N, E)
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                               "method `generate_square_subsequent_mask` to create this mask.")
        length, batch, _ = query.shape
        source, heads, head_dim = key.shape[0], self.num_heads, self.head_dim
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)  # (L or S, N, E)
        mask = _float_mask(attn_mask, q.dtype)
        if mask is not None:
            if mask.dim() == 2:
                if mask.shape != (length, source):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {tuple(mask.shape)}, but should be "
                                       f"{(length, source)}.")
                mask = mask.unsqueeze(0)
            elif mask.dim() != 3 or mask.shape != (batch * heads, length, source):
                raise RuntimeError(f"The shape of the {mask.dim()}D attn_mask is {tuple(mask.shape)}, but should be "
                                   f"{(batch * heads, length, source)}.")
        padding = _float_mask(key_padding_mask, q.dtype)
        if padding is not None:
            if padding.shape != (batch, source):
                raise RuntimeError(f"expecting key_padding_mask shape of {(batch, source)}, but got "
                                   f"{tuple(padding.shape)}")
            padding = padding.view(batch, 1, 1, source).expand(-1, heads, -1, -1).reshape(batch * heads, 1, source)
            mask = padding if mask is None else mask + padding
        q = q.reshape(length, batch * heads, head_dim).transpose(0, 1)  # (N*H, L, hd)
        k = k.reshape(source, batch * heads, head_dim).transpose(0, 1)
        v = v.reshape(source, batch * heads, head_dim).transpose(0, 1)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / head_dim)) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            weights = F.dropout(weights, p=dropout) if dropout > 0 else weights  # (returned after dropout, as torch's)
            out = weights @ v  # (N*H, L, hd)
            out = out.transpose(0, 1).reshape(length, batch, self.embed_dim)
            weights = weights.view(batch, heads, length, source)
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            if mask is not None:
                mask = mask.unsqueeze(0) if mask.size(0) == 1 else mask.view(batch, heads, -1, source)
            out = F.scaled_dot_product_attention(q.view(batch, heads, length, head_dim),
                                                 k.view(batch, heads, source, head_dim),
                                                 v.view(batch, heads, source, head_dim), mask, dropout)
            out = out.permute(2, 0, 1, 3).reshape(length, batch, self.embed_dim)
        out = self.out_proj(out)
        if not batched:
            return out.squeeze(1), None if weights is None else weights.squeeze(0)
        return (out.transpose(0, 1) if self.batch_first else out), weights

    def _check_shapes(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
                      attn_mask: Optional[Tensor]) -> None:
        """torch's refusals of inputs of the wrong rank or size, in its words."""
        if query.dim() not in (2, 3):
            raise AssertionError(f"query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D query tensor")
        kind, rank = ("batched (3-D)", 3) if query.dim() == 3 else ("unbatched (2-D)", 2)
        if key.dim() != rank or value.dim() != rank:
            raise AssertionError(f"For {kind} `query`, expected `key` and `value` to be {rank}-D but found {key.dim()}-D "
                                 f"and {value.dim()}-D tensors respectively")
        if key_padding_mask is not None and key_padding_mask.dim() != rank - 1:
            raise AssertionError(f"For {kind} `query`, expected `key_padding_mask` to be `None` or {rank - 1}-D but found "
                                 f"{key_padding_mask.dim()}-D tensor instead")
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise AssertionError(f"For {kind} `query`, expected `attn_mask` to be `None`, 2-D or 3-D but found "
                                 f"{attn_mask.dim()}-D tensor instead")
        if query.shape[-1] != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {query.shape[-1]}")
        if self.kdim == self.vdim == self.embed_dim:
            if key.shape != value.shape:
                raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        elif key.shape[:-1] != value.shape[:-1]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:-1]} do not match value's {value.shape[:-1]}")

    def __getattr__(self, name: str) -> Tensor | nn.Module:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name not in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                raise
        raise AttributeError(f"SplitMultiheadAttention has no {name}: ssvi_cli.sparsify split nn.MultiheadAttention's "
                             "in-projection into the layers q_proj, k_proj and v_proj (a sparse layer's dense posterior "
                             "mean is layer.to_dense(layer.mu); a plain one's, layer.weight)")

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


def _copy(layer: nn.Linear, weight: Tensor, bias: Optional[Tensor], source: Tensor, source_bias: Optional[Tensor]) -> None:
    """``layer`` takes ``weight`` and ``bias`` (None: no bias, as torch lets out_proj have none while the
    in-projection has one), each trainable as its source was."""
    layer.weight = nn.Parameter(weight.clone(), requires_grad=source.requires_grad)
    layer.bias = None if bias is None or source_bias is None else \
        nn.Parameter(bias.clone(), requires_grad=source_bias.requires_grad)


def _float_mask(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A boolean mask (True: not attended) as an additive one, 0 or -inf; a float mask as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of masks are supported, not {mask.dtype}")
    return mask.to(dtype)
