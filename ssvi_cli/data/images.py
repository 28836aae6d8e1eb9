"""Image files, one way for every command: which files count as inputs, how a folder is searched for
them and how one file is decoded (``imagefolder:PATH`` training data, ``ssvi infer`` inputs and
``--ood PATH`` folders all go through here, so an image that one of them reads, the others read the
same way).
"""

from __future__ import annotations

import io
import logging
import os
import stat
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Sequence

import numpy as np
import torch

from ssvi_cli.data.spec import DataError
from ssvi_cli.warned import warn_once, warned

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
                  ".pbm", ".pnm")
ARRAY_SUFFIX = ".npy"
_MODES = ("1", "L", "P", "LA", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "La", "RGBa")  # PIL modes read as 8-bit
_ALPHA_MODES = ("LA", "PA", "RGBA", "La", "RGBa")
_GRAY16_MODES = ("I;16", "I;16B", "I;16L")
_WHOLE_JPEGS: ContextVar[bool] = ContextVar("ssvi_whole_jpegs", default=False)  # whole_jpegs


@contextmanager
def whole_jpegs(on: bool = True) -> Iterator[None]:
    """Within it (``on``), :func:`read_image` decodes every JPEG whole, as ssvi did before it decoded
    large ones at a reduced scale: for a model or run made then (its data description has no
    ``reduced_jpeg``), so that it sees the pixels it was trained on. A context variable: threads that
    read for it are started in a copy of the caller's context (``decoding.read_ahead``)."""
    token = _WHOLE_JPEGS.set(on)
    try:
        yield
    finally:
        _WHOLE_JPEGS.reset(token)


def reducing_jpegs() -> bool:
    """Whether a large JPEG is decoded at a reduced scale here (not inside :func:`whole_jpegs`)."""
    return not _WHOLE_JPEGS.get()


def find_files(folder: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES, apart: Sequence[Path] = ()) -> list[Path]:
    """The files under ``folder`` whose suffix (any case) is one of ``suffixes``, recursively and
    sorted. Hidden files and everything inside hidden folders (a name starting with ``.``, such as
    the ``._photo.jpg`` files macOS leaves beside copied images) are skipped. Links are followed, to
    folders as to files (each folder is searched once: a link back up is not a loop); a link to
    nothing is kept, so that reading it names it rather than the file going missing unseen. A link
    into one of the folders ``apart`` (an image folder's other classes, its root) is passed over with
    a warning: its images would be read under this folder's label. So are, where ``suffixes`` name
    images, files of another kind that Pillow opens (``.psd``, ``.tga``, ...): counted in a warning,
    so that a folder that loses images to their names says so; and, with a warning too, a named pipe,
    socket or device with an image's name, whose read would wait for ever."""
    folder = Path(folder)
    found: list[Path] = []
    passed: dict[str, int] = {}  # suffix -> files of an image kind ssvi does not take
    special = 0  # named pipes, sockets and devices with an image's name
    seen: set[str] = set()
    own = Path(os.path.realpath(folder))
    others = [Path(os.path.realpath(p)) for p in apart]
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        astray = not Path(real).is_relative_to(own) and any(Path(real).is_relative_to(o) for o in others)
        if real in seen or astray:
            if astray:
                warn_once(logging.getLogger(__name__), (top, real), "%s leads to %s, outside %s; its images are "
                          "passed over", shown(top), shown(real), shown(folder))
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # a folder reached twice keeps one name
        for name in (f for f in files if not f.startswith(".")):
            suffix = Path(name).suffix.lower()
            if suffix in suffixes and _special(Path(top) / name):
                special += 1
            elif suffix in suffixes:
                found.append(Path(top) / name)
            elif suffix in _pillow_suffixes() or suffix in CAMERA_SUFFIXES:
                passed[suffix] = passed.get(suffix, 0) + 1
    if special:  # a named pipe would block the read for ever
        warn_once(logging.getLogger(__name__), (str(folder), "special"), "%s: %s passed over: a named pipe, socket "
                  "or device, not a regular file", shown(folder), "1 file" if special == 1 else f"{special} files")
    if passed and set(suffixes) & set(IMAGE_SUFFIXES):
        kinds = ", ".join(f"{n} {suffix}" for suffix, n in sorted(passed.items()))
        warn_once(
            logging.getLogger(__name__), (str(folder), "kinds"),
            "%s: %s passed over (%s), a kind ssvi does not read as images (%s); save them as .png or .jpg to use them",
            shown(folder), "1 file" if sum(passed.values()) == 1 else f"{sum(passed.values())} files", kinds,
            " ".join(IMAGE_SUFFIXES))
    return sorted(found, key=lambda p: p.parts)  # as on POSIX everywhere: a Windows path sorts ignoring case


def _special(path: Path) -> bool:
    """Whether ``path`` (its link followed) is there and not a regular file: a named pipe, socket or
    device, found in a folder. A link to nothing is not: reading it names it."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _pillow_suffixes() -> frozenset[str]:
    """File suffixes of the image formats Pillow opens (for the warning of :func:`find_files`)."""
    global _PILLOW
    if _PILLOW is None:
        from PIL import Image

        Image.init()
        _PILLOW = frozenset(s for s, kind in Image.registered_extensions().items() if kind in Image.OPEN)
    return _PILLOW


_PILLOW: Optional[frozenset[str]] = None
# Photos' formats that Pillow does not open without a plug-in (a phone's HEIC, a camera's raw files):
# passed over with the same warning, not in silence.
CAMERA_SUFFIXES = frozenset({".heic", ".heif", ".avif", ".jxl", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf",
                             ".rw2", ".raf"})


def shown(path: Path | str) -> str:
    """``path`` as text that any output takes: a name's bytes that are not UTF-8 (a folder unpacked
    from a Latin-1 archive) as ``\\xe9`` escapes, the rest as it is."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


STREAM_LIMIT = 1 << 30  # bytes read from a pipe or device at most (/dev/zero never ends)
STDIN = "-"  # the input name that means standard input, as in most command-line tools
NOT_AN_IMAGE = "not an image format Pillow knows"  # read_image's words for a file it cannot identify


def open_stream(path: Path, error: type[Exception] = DataError) -> io.BytesIO:
    """``path``'s bytes, read once into memory: for a pipe or device (``/dev/stdin``, a shell's
    ``<(...)``, or ``-`` for standard input), which can be read only once and not seeked, as the image
    and array readers need. A terminal (nothing piped in) and a stream over ``STREAM_LIMIT`` raise
    ``error``."""
    if str(path) == STDIN and sys.stdin is None:  # closed when ssvi started (<&-)
        raise error(f"{path}: standard input is closed; pipe or redirect a file into it (< image.png)")
    try:
        with (open(path, "rb") if str(path) != STDIN else open(sys.stdin.fileno(), "rb", closefd=False)) as f:
            if os.isatty(f.fileno()):
                raise error(f"{path} is a terminal; pipe or redirect a file into it (< image.png)")
            data = f.read(STREAM_LIMIT + 1)
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    if not data:
        raise error(f"{path} is empty: nothing was piped or redirected into it")
    if len(data) > STREAM_LIMIT:
        raise error(f"{path}: more than {STREAM_LIMIT >> 20} MiB; save it to a file and pass that")
    return io.BytesIO(data)


NPY_MAGIC = b"\x93NUMPY"  # the first bytes of every .npy file


def starts_as_npy(path: Path, stream: Optional[io.BytesIO] = None) -> bool:
    """Whether the file (or ``stream``, its bytes already read) begins with numpy's header."""
    if stream is not None:
        return stream.getvalue()[:len(NPY_MAGIC)] == NPY_MAGIC
    with open(path, "rb") as f:
        return f.read(len(NPY_MAGIC)) == NPY_MAGIC


def _npy_sizes(path: Path, stream: Optional[io.BytesIO]) -> tuple[int, int]:
    """The data bytes a ``.npy`` header describes and those the file holds after it (an object array
    describes none: numpy refuses it when loading)."""
    fh = stream if stream is not None else open(path, "rb")
    try:
        fh.seek(0)
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(fh)
        start = fh.tell()
        held = fh.seek(0, io.SEEK_END) - start
        fh.seek(0)
    finally:
        if stream is None:
            fh.close()
    return (0 if dtype.hasobject else int(np.prod(shape, dtype=object)) * dtype.itemsize), held


# A logo or a digit drawn in alpha alone would be read as blank: said of the first such image or array.
ALPHA_KEY = ("", "alpha")
TRANSPARENT = ("%s has transparent pixels: alpha is dropped, not composited (as torchvision's image loader does), so "
               "the model sees the colour stored under them; flatten such images onto a background to choose it "
               "(further images with transparency are not named)")


def read_array(path: Path, error: type[Exception] = DataError, stream: Optional[io.BytesIO] = None,
               name: Optional[str] = None) -> np.ndarray:
    """A ``.npy`` file as an array, never unpickled: mapped from the file, read only (``stream``: its
    bytes already read, loaded from them). A file without numpy's header, one holding Python objects,
    or a cut one raises ``error`` with a one-line message starting with ``name`` (default: the path)."""
    name = name or str(path)
    try:
        if not starts_as_npy(path, stream):
            raise error(f"{name}: not a .npy file (it lacks numpy's header); save arrays with np.save")
        claimed, held = _npy_sizes(path, stream)
        if claimed > held:  # before numpy allocates what the header claims (a 384-byte file, 238 GiB)
            raise error(f"{name}: not a readable .npy array (its header describes {claimed:,} bytes of data, the "
                        f"file holds {held:,}: cut short or damaged)")
        # a file is mapped, not read: its rows are read as they are used (a 5 GB array, a few at once)
        arr = np.load(stream, allow_pickle=False) if stream is not None else np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as exc:
        if "max_header_size" in str(exc):  # numpy's advice (as for objects) is to load it unsafely
            raise error(f"{name}: not a readable .npy array (its header is longer than numpy reads safely, "
                        "past any np.save writes)") from None
        if "allow_pickle" in str(exc) or "Python objects" in str(exc):  # numpy's advice is to load it unsafely
            raise error(f"{name}: holds pickled Python objects, not a numeric array; save the pixels "
                        "with np.save") from None
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise error(f"{name}: not a readable .npy array ({reason})") from None
    if not isinstance(arr, np.ndarray):
        raise error(f"{name}: not a single .npy array")
    return arr


def read_image(path: Path, error: type[Exception] = DataError, stream: Optional[BinaryIO] = None,
               size: Optional[int] = None) -> torch.Tensor:
    """One image file as (1, C, H, W): uint8 with C in {1, 3, 4} (gray, RGB, RGB with alpha), or
    float in [0, 1] for 16-bit gray. ``stream``: the file's bytes already read (``open_stream``);
    ``path`` then only names it. ``size``: the side it will be resized to; a JPEG is then decoded at
    scale 1/8, 1/4 or 1/2 (libjpeg's DCT scaling), the smallest whose 8, 4 or 2 divides both its sides
    and keeps them at least ``2 * size`` (:func:`_reduction`): a photo decodes several times faster
    and lands within a few levels of the whole decode once resized (not inside :func:`whole_jpegs`).
    A file PIL cannot read, one in a mode it cannot convert to these, or one larger than PIL's
    decompression-bomb limit raises ``error`` with a one-line message that names the file."""
    from PIL import Image, UnidentifiedImageError

    what, fix = ((f"standard input ({path})", _PIPE)
                 if str(path) in (STDIN, "/dev/stdin") else (f"image {path}", "replace or remove the file"))
    try:
        with Image.open(stream if stream is not None else path) as img:
            if size and reducing_jpegs() and (scale := _reduction(img.size, size)) > 1:  # JPEG only: others whole
                img.draft(None, (img.size[0] // scale, img.size[1] // scale))
            img.load()
            mode = img.mode
            if mode in _GRAY16_MODES:
                gray = np.asarray(img, dtype=np.float32) / 65535.0
                return torch.from_numpy(gray).view(1, 1, *gray.shape)
            if mode not in _MODES:
                raise error(f"{what} has the unsupported mode {mode!r}; save it as 8-bit gray or RGB")
            alpha = mode in _ALPHA_MODES or "transparency" in img.info
            target = "L" if mode in ("1", "L") else ("RGBA" if alpha else "RGB")
            arr = np.asarray(img.convert(target), dtype=np.uint8)
            if target == "RGBA" and not warned(ALPHA_KEY) and arr[:, :, 3].min() < 255:
                warn_once(logging.getLogger(__name__), ALPHA_KEY, TRANSPARENT, what)
    except UnidentifiedImageError:  # its own message names the file as Python's repr of a stream
        raise error(f"{what} cannot be read ({NOT_AN_IMAGE}); {fix}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise error(f"{what} cannot be read ({reason}); {fix}") from None
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(np.array(arr.transpose(2, 0, 1))).unsqueeze(0)  # a writable copy


def _reduction(shape: tuple[int, int], size: int) -> int:
    """The JPEG reduction (8, 4, 2; 1 for none) that divides both sides of an image of ``shape``
    exactly and leaves both at least twice ``size``. A side it does not divide is decoded one pixel
    wider, mostly padding, which the resize then squeezed in: up to 31 levels off the whole decode."""
    width, height = shape
    return next((s for s in (8, 4, 2) if width % s == 0 and height % s == 0
                 and min(width, height) // s >= 2 * size), 1)


_NAMED = 10  # unreadable files named beside the first
_PIPE = "pipe an image file or a .npy array into it"


def unreadable(bad: Sequence[tuple[str, Exception]], total: int, what: str, error: type[Exception] = DataError) -> Exception:
    """One error for all of ``total`` inputs (distinct files) that could not be read, so that one run
    names every one: the first with its reason, ten more by name, then a count; a file named twice
    counts once. One alone keeps its own message."""
    by_name: dict[str, Exception] = {}
    for name, exc in bad:
        by_name.setdefault(name, exc)
    bad = list(by_name.items())
    if len(bad) == 1:
        return bad[0][1]
    more = len(bad) - 1 - _NAMED
    others = ", ".join("standard input" if name == STDIN else shown(name) for name, _ in bad[1:1 + _NAMED]) + (
        f" and {more} more" if more > 0 else "")
    first = str(bad[0][1]).replace("; replace or remove the file", "").replace(f"; {_PIPE}", "")
    return error(f"{len(bad)} of {total} {what} cannot be read: {first}; also {others}; replace or remove them")


class UnreadableImages(DataError):
    """Image files that could not be read, each ``(name, error)`` in ``bad`` (a name once, with its
    first error), among the ``total`` distinct ``files`` tried; the message names them
    (:func:`unreadable`). ``where``: their folder, if one."""

    def __init__(self, bad: Sequence[tuple[str, Exception]], files: Sequence[Path], what: str, where: str = "") -> None:
        first: dict[str, Exception] = {}
        for name, exc in bad:  # an array unreadable in several chunks: once
            first.setdefault(name, exc)
        self.bad, self.files, self.where, self.total = list(first.items()), tuple(files), where, len(set(files))
        super().__init__(str(unreadable(self.bad, self.total, what)))

    @classmethod
    def merged(cls, errors: Sequence["UnreadableImages"]) -> "UnreadableImages":
        """One error for the files of several decodes (a folder's splits)."""
        where = errors[0].where
        return cls([b for e in errors for b in e.bad], [f for e in errors for f in e.files],
                   f"images of {where}" if where else "images", where)
