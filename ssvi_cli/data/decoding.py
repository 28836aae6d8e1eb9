"""Image files decoded into a model's pixels, a few at once: every image of a folder's split as one
uint8 tensor (:func:`decode_images`), and the files of any list read ahead by threads, in order
(:func:`read_ahead`), which ``evaluate --ood FOLDER`` uses too."""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextvars import copy_context
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from ssvi_cli.data.images import UnreadableImages, read_image
from ssvi_cli.data.spec import DataError, DataSpec
from ssvi_cli.data.transforms import preprocess
from ssvi_cli.warned import HeldWarning, held_warnings, warn_once

logger = logging.getLogger(__name__)
progress = logging.getLogger("ssvi_cli.progress")  # lines for a person waiting (printed by the command line)

_PROGRESS_EVERY_S = 5.0  # seconds between progress lines while decoding
_FIRST_PROGRESS_S = 1.0  # seconds of decoding before the first
# Threads reading image files at once, at most (read_ahead): each holds its image decoded whole (and,
# resizing it, a float copy): 24-megapixel PNGs peaked at 0.9 GB read by one, 1.6 GB by 2, 2.2 GB by 4.
MAX_READERS = 4


def decode_images(files: tuple[Path, ...], image_size: int, channels: int, what: str = "images",
                  where: str = "") -> torch.Tensor:
    """Decode ``files`` into one uint8 (N, channels, image_size, image_size) tensor, a few files at once
    (``read_ahead``). Progress goes to the ``ssvi_cli.progress`` logger (which the command line
    prints) once decoding has taken a second, then every few seconds (a large folder was decoded in
    silence)."""
    shape = (channels, image_size, image_size)
    unit = DataSpec("decode", shape, 1, ("-",), (0.0,) * channels, (1.0,) * channels)  # resize only
    _check_fits(len(files), shape, what)
    out = torch.empty((len(files), *shape), dtype=torch.uint8)
    logger.debug("decoding %d %s into %dx%dx%d uint8", len(files), what, *shape)
    last = time.monotonic()
    said = False
    bad: list[tuple[str, Exception]] = []  # all of them named at once, not one per try
    as_pixels = lambda x: preprocess(x, unit)[0].mul_(255.0).round_().to(torch.uint8)  # noqa: E731
    for i, (path, pixels) in enumerate(read_ahead(files, image_size, as_pixels)):
        if isinstance(pixels, DataError):
            bad.append((str(path), pixels))
        else:
            out[i] = pixels
        # the first line soon (a person waits for some sign), then one every few seconds
        if time.monotonic() - last >= (_PROGRESS_EVERY_S if said else _FIRST_PROGRESS_S) or (said and i + 1 == len(files)):
            progress.info("decoded %s/%s %s", f"{i + 1:,}", f"{len(files):,}", what)
            last, said = time.monotonic(), True
    if bad:
        raise UnreadableImages(bad, files, what, where)
    return out


def _check_fits(count: int, shape: tuple[int, ...], what: str) -> None:
    """Refuse, before any file is decoded, images that would not fit in the memory the system has
    available (times the processes of this node that each decode them, under ``--nproc``/torchrun):
    they were decoded for minutes or hours and then the process was swapped out or killed."""
    from ssvi_cli import machine

    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    need = count * math.prod(shape) * processes
    if (available := machine.short_of_memory(need)) is None:
        return
    each = f", in each of the {processes} processes" if processes > 1 else ""
    size = lambda n: f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"  # noqa: E731
    raise DataError(f"the {count:,} {what} take {size(need)} decoded at {'x'.join(map(str, shape))} "
                    f"(8-bit pixels, held in memory{each}); this machine has {size(available)} available: "
                    "use fewer images, a smaller data.image_size when training, or a machine with more memory")


def _read(path: Path, size: Optional[int], prepare: Optional[Callable[[torch.Tensor], torch.Tensor]]
          ) -> torch.Tensor | DataError:
    try:
        pixels = read_image(path, size=size)
        return prepare(pixels) if prepare is not None else pixels
    except DataError as exc:
        return exc


def _read_holding(path: Path, size: Optional[int], prepare: Optional[Callable[[torch.Tensor], torch.Tensor]]
                  ) -> tuple[torch.Tensor | DataError, list[HeldWarning]]:
    """:func:`_read` in a reading thread, with the warnings it gave, for the taker to say in order."""
    warnings: list[HeldWarning] = []
    with held_warnings(warnings):
        return _read(path, size, prepare), warnings


def read_ahead(files: tuple[Path, ...], size: Optional[int],
               prepare: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Iterator[tuple[Path, torch.Tensor | DataError]]:
    """``(path, prepare(pixels) or the DataError of reading it)`` for each of ``files`` in order, read
    (``read_image(path, size=size)``) and prepared (``None``: as read) by up to
    ``torch.get_num_threads()`` threads at once (Pillow decodes outside Python's lock: a photo folder
    decodes about twice as fast on 2 cores), at most ``MAX_READERS``, with as many files begun as
    threads: each held whole while it is read, and as read, until it is taken, where ``prepare`` is
    ``None`` (a large PNG costs its decoded size in each, and in the one taken); an error or Ctrl-C in
    the taker begins no further file."""
    workers = max(1, min(torch.get_num_threads(), len(files), MAX_READERS))
    if workers == 1:
        yield from ((path, _read(path, size, prepare)) for path in files)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="ssvi-decode")
    pending: deque[Future] = deque()
    try:
        ahead = iter(files)
        for path in itertools.islice(ahead, workers):
            pending.append(pool.submit(copy_context().run, _read_holding, path, size, prepare))  # whole_jpegs
        for path in files:
            result, warnings = pending.popleft().result()
            for logger_, key, message, args in warnings:
                warn_once(logger_, key, message, *args)
            for more in itertools.islice(ahead, 1):
                pending.append(pool.submit(copy_context().run, _read_holding, more, size, prepare))
            yield path, result
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
