"""``--init-from torchvision:WEIGHTS``: torchvision's published weights for the run's builder.

The weights are named as torchvision names them (``ResNet18_Weights.IMAGENET1K_V1``, the bare
member ``IMAGENET1K_V1``, or ``DEFAULT``) and must belong to the run's builder. They are fetched
by torchvision's own machinery (``WeightsEnum.get_state_dict``), which keeps one copy in torch.hub's
cache, ``$TORCH_HOME/hub/checkpoints/<the URL's file name>``: downloaded once, read offline after.

Published weights were trained on other data (ImageNet: 1000 classes, 3 channels), so they are
adapted as fine-tuning usually does it: the layers whose shapes depend on the number of classes
(the head) are left out, to be re-initialised; the first convolution's kernel is adapted to the
data's channels (:func:`adapt_stem_kernel`); every other tensor must fit the model exactly.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from ssvi_cli.config import ConfigError
from ssvi_cli.fileio import brief
from ssvi_cli.network import stall_limit
from ssvi_cli.models import AUX_HEADS
from ssvi_cli.registry import Registry, UnknownName

logger = logging.getLogger(__name__)

# Old checkpoints (densenet) name a dense layer's parts ``norm.1``; the modules are now ``norm1``.
_LEGACY_DENSE_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.[a-z_]+)$")


class UnknownWeights(UnknownName, ConfigError):
    """A weights name that the run's torchvision builder does not publish."""


@dataclass(frozen=True)
class Adapted:
    """A published state_dict fitted to the run's model: ``head`` keys left out (to re-initialise),
    ``stem`` says how the first convolution's kernel was adapted (None: taken as is)."""

    state: dict[str, Tensor]
    head: tuple[str, ...]
    stem: Optional[str]


def resolve_weights(builder: str, name: str) -> Any:
    """The ``torchvision.models.WeightsEnum`` member ``name`` of ``builder`` (``DEFAULT`` allowed)."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(builder)
    except (ValueError, KeyError):
        raise ConfigError(f"torchvision:{builder} has no published weights for --init-from") from None
    valid: Registry[Any] = Registry(f"weights of torchvision:{builder}", error=UnknownWeights, sort=False)
    for member in enum.__members__:
        valid.add(f"{enum.__name__}.{member}", enum[member])
    full = name if "." in name else f"{enum.__name__}.{name}"
    if full.split(".")[0] != enum.__name__:
        raise UnknownWeights(f"--init-from torchvision:{name} are not weights of torchvision:{builder}; "
                             f"its weights are: {', '.join(valid.names())}")
    return valid.get(full)


def cache_file(weights: Any) -> Path:
    """Where torch.hub keeps (and looks for) the file of ``weights``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def fetch_state_dict(weights: Any, progress: bool = False) -> dict[str, Tensor]:
    """The published state_dict, from torch.hub's cache or downloaded into it (``weights_only``).

    A failed download is one line naming the cache file to put in place by hand.
    """
    label = f"--init-from torchvision:{weights!r}"
    path = cache_file(weights)
    cached = path.is_file()
    if not cached:
        logger.info("downloading %s to %s", weights.url, path)
    # Entered outside the try: a bad SSVI_NETWORK_TIMEOUT is its own one-line error, not a failed download.
    with stall_limit():
        try:
            # torch.hub announces a download on stdout, which must stay clean for `--json`.
            with contextlib.redirect_stdout(io.StringIO()):
                state = weights.get_state_dict(progress=progress and not cached, check_hash=True,
                                               map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a network, hash or reader failure is one line
            reason = _first_line(exc)
            if cached:
                raise ConfigError(f"{label}: {path} is not a readable state_dict ({reason}); "
                                  "delete it to download it again") from None
            if isinstance(exc, OSError):
                raise ConfigError(f"{label}: cannot download {weights.url} ({reason}); without network, "
                                  f"put that file at {path}") from None
            raise ConfigError(f"{label}: the download of {weights.url} failed ({reason})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"{label}: {path} does not hold a state_dict; delete it to download it again")
    return state


def adapt_stem_kernel(kernel: Tensor, channels: int) -> Tensor:
    """A pretrained first-conv kernel ``(out, c, kh, kw)`` made to read ``channels`` input channels.

    One channel: the sum over the ``c`` pretrained channels, so a gray image gives exactly what the
    pretrained kernel gives for that image copied into every channel. More channels: pretrained
    channel ``i mod c`` for channel ``i`` (repeated cyclically), scaled by ``c / channels`` so that
    similar input channels keep the pretrained pre-activation scale.
    """
    c = kernel.shape[1]
    if channels == 1:
        return kernel.sum(dim=1, keepdim=True)
    picks = torch.arange(channels) % c
    return kernel[:, picks] * (c / channels)


def adapt_state(state: dict[str, Tensor], model: nn.Module, reference: nn.Module) -> Adapted:
    """Fit ``state`` to ``model`` (the run's architecture; ``reference`` is the same with the weights'
    number of classes): head keys dropped, the stem kernel adapted, loading's legacy fixes applied
    (dense-layer key names, ``num_batches_tracked`` absent from old files); the auxiliary classifiers
    of GoogLeNet and Inception v3, which the run's model is built without, left out."""
    expected, ref = model.state_dict(), reference.state_dict()
    head = tuple(k for k, v in expected.items() if k in ref and ref[k].shape != v.shape)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        legacy = _LEGACY_DENSE_KEY.match(key)
        key = legacy.group(1) + legacy.group(2) if legacy and key not in expected else key
        if key not in head and not (key.startswith(AUX_HEADS) and key not in expected):
            out[key] = value  # an auxiliary classifier's weights go with the head it was built without
    for key in expected:
        if key.endswith(".num_batches_tracked") and key not in out and key not in head:
            out[key] = torch.tensor(0, dtype=torch.long)
    stem_name = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    key, note = f"{stem_name}.weight", None
    if stem_name is not None and key not in head and key in out and out[key].dim() == 4:
        have, want = out[key].shape[1], expected[key].shape[1]
        if have != want:
            out[key] = adapt_stem_kernel(out[key], want)
            how = "summed over" if want == 1 else f"repeated and scaled by {have}/{want} from"
            note = f"{key} {how} the {have} pretrained input channels"
    return Adapted(out, head, note)


def _first_line(exc: BaseException) -> str:
    return brief(exc, 200)
