"""What a module replaced by another would not carry over: hooks (on it, or on its weights) and
pruning or parametrizations. :func:`ssvi_cli.sparsify` refuses a layer with either, and keeps an
attention with either whole."""

from __future__ import annotations

from torch import nn

HOOK_DICTS = {"forward": ("_forward_hooks",), "forward pre": ("_forward_pre_hooks",),
              "backward": ("_backward_hooks", "_backward_pre_hooks"),
              "state-dict": ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                             "_load_state_dict_post_hooks")}


def hook_kinds(module: nn.Module) -> list[str]:
    """The kinds of hooks on ``module`` or on its own weights (``tensor``), as a message names them."""
    kinds = [kind for kind, attrs in HOOK_DICTS.items()
             if any(not _torchs_own(h) for a in attrs for h in (getattr(module, a, None) or {}).values())]
    kinds += ["tensor"] * any(getattr(p, "_backward_hooks", None) or getattr(p, "_post_accumulate_grad_hooks", None)
                              for p in module.parameters(recurse=False))
    return kinds


def reparametrized(module: nn.Module) -> bool:
    """Pruned (``prune``: ``weight_orig``) or reparametrized (``parametrize``, ``weight_norm``)."""
    from torch.nn.utils import parametrize

    return parametrize.is_parametrized(module) or any(n.endswith(("_orig", "_g")) for n, _ in module.named_parameters(recurse=False))


def _torchs_own(hook: object) -> bool:
    """The state-dict hook torch's ``weight_norm`` parametrization registers (it reads an older state
    dict's ``weight_g``/``weight_v``), which ``remove_parametrizations`` leaves behind, with no handle
    to remove it: a replacement has no use for it."""
    fn = getattr(hook, "hook", hook)  # torch wraps a state-dict hook in a _WrappedHook
    return getattr(fn, "__module__", "") == "torch.nn.utils.parametrizations" and \
        getattr(fn, "__qualname__", "").endswith("._weight_norm_compat_hook")
