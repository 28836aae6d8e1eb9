"""Reading torchvision's datasets from their files on disk (``--data-dir``, ``--download``): each
decoded once into uint8 tensors, with one-line errors that name the files missing or damaged, the
folder ``--data-dir`` should have named, and labels outside the classes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ssvi_cli.data.spec import DataError, DatasetUnavailable, RawImages
from ssvi_cli.network import stall_limit, stall_seconds

_SVHN_NAMES = tuple(str(i) for i in range(10))  # its label 10 (a zero) read as 0 by torchvision


def expected_files(cls: Any, split: str) -> list[str]:
    """The files a torchvision dataset class reads for ``split`` ("train" or "test"), by name, in the
    folder its ``location`` gives: MNIST's four idx files (unpacked), CIFAR's batches and meta file,
    SVHN's one ``.mat`` per split; empty for a class this does not know."""
    if hasattr(cls, "resources"):  # the MNIST family
        return [Path(url).name.removesuffix(".gz") for url, _ in cls.resources]
    if hasattr(cls, "train_list"):  # CIFAR-10 and CIFAR-100
        return [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    if hasattr(cls, "split_list"):  # SVHN
        return [cls.split_list[split][1]]
    return []


def _inner_hint(data_dir: Path, where: Path, expected: Sequence[str]) -> str:
    """A --data-dir given as the dataset's own folder (``tv/MNIST`` or ``tv/MNIST/raw``, so that
    torchvision looks in ``tv/MNIST/MNIST/raw``): the folder that holds it, when the files are there."""
    inner = where.relative_to(data_dir).parts  # the folders torchvision adds: MNIST/raw, cifar-10-batches-py
    for j in range(min(len(inner), len(data_dir.parts)), 0, -1):
        if data_dir.parts[-j:] == inner[:j]:
            holder = Path(*data_dir.parts[:-j] or (".",))
            if expected and all((holder.joinpath(*inner) / f).is_file() for f in expected):
                return f"give the folder that holds {inner[0]}/, {holder} here; "
    return ""


def _call_torchvision(name: str, factory: Callable[[], object], data_dir: Path, where: Path, download: bool,
                      expected: Sequence[str] = (), archive: str = ""):
    """Run a torchvision constructor, turning its missing-file errors into DataErrors (which name the
    ``expected`` files missing from ``where``, the folder it reads below ``data_dir``, and the
    dataset's ``archive`` when it lies in ``data_dir`` unpacked)."""
    stall_seconds()  # a bad SSVI_NETWORK_TIMEOUT is its own one-line error, not one of the files'
    if data_dir.exists() and not data_dir.is_dir():  # --download would fail as well: nothing goes in a file
        raise DatasetUnavailable(f"{name}: the data folder {data_dir} is a file, not a folder; give the folder that "
                                 "holds the dataset (or one to download it into)")
    try:
        with stall_limit():
            return factory()
    except RuntimeError as err:
        said = " ".join(str(err).split())  # torchvision's download errors span lines; ours are one
        if expected and "not found" not in said and all((where / f).is_file() for f in expected):
            raise _unreadable(name, where, expected, said) from err  # MNIST's truncated file: no download is tried
        if download:
            raise DatasetUnavailable(f"downloading {name} into {where} failed ({said}); check the network") from err
        missing = [f for f in expected if not (where / f).is_file()]
        packed = [f for f in missing if (where / f"{f}.gz").is_file()]  # fetched by hand, not unpacked
        detail = (f"missing {', '.join(missing)}; " if missing else
                  f"its files ({', '.join(expected)}) are damaged or not the original ones; " if expected else "")
        several = len(packed) > 1
        detail += (f"{'their .gz archives are' if several else 'its .gz archive is'} there: unpack with gunzip; "
                   if packed else "")
        if missing and archive and (data_dir / archive).is_file():  # CIFAR's tar.gz fetched by hand
            detail += (f"its archive {archive} is in {data_dir}: --download unpacks it, without the network "
                       "when it is the original; ")
        detail += _inner_hint(data_dir, where, expected)
        raise DatasetUnavailable(
            f"{name} not found or corrupted at {where} ({detail}torchvision: {said}); pass --download "
            f"(in a sweep: --set data.download=true) to fetch it, or place the original files there"
        ) from err
    except (AssertionError, ValueError, TypeError, IndexError, EOFError) as err:  # files there, but not readable
        said = " ".join(str(err).split()) or type(err).__name__  # as MNIST's: torchvision asserts their header
        raise _unreadable(name, where, expected, said) from err
    except OSError as err:  # download without network
        said = " ".join(str(err).split())
        if download and expected and all((where / f).is_file() for f in expected):  # there, but not torchvision's
            raise DatasetUnavailable(f"{name}'s files at {where} are there but fail torchvision's checksum (damaged, "
                                     f"or not the original ones), and fetching them again failed ({said}); replace "
                                     "them with the original files") from err
        raise DatasetUnavailable(f"cannot read or download {name} at {where} ({said}); check the path/network") from err


def _unreadable(name: str, where: Path, expected: Sequence[str], said: str) -> DatasetUnavailable:
    """Files that are there but do not decode: --download alone would keep them (torchvision fetches
    only what is missing), so they must go first."""
    files = f" ({', '.join(expected)})" if expected else ""
    return DatasetUnavailable(
        f"{name} at {where}: its files{files} do not read as {name}'s (torchvision: {said}); replace them "
        f"with the original files, or remove them and pass --download (in a sweep: --set data.download=true)")


def torchvision_loader(name: str, cls_name: str,
                       location: Callable[[Path], Path]) -> Callable[[Path, bool, bool], RawImages]:
    """Loader for a torchvision dataset class, decoded once into uint8 (N, C, H, W) tensors."""

    def load(data_dir: Path, train: bool, download: bool) -> RawImages:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        if cls_name == "SVHN":
            make = lambda: cls(root=str(data_dir), split="train" if train else "test", download=download)  # noqa: E731
        else:
            make = lambda: cls(root=str(data_dir), train=train, download=download)  # noqa: E731
        fresh = [p for p in (location(data_dir), *location(data_dir).parents) if not p.exists()]  # deepest first
        try:
            expected = expected_files(cls, "train" if train else "test")
            archive = getattr(cls, "filename", "") if hasattr(cls, "train_list") else ""  # CIFAR's tar.gz
            ds = _call_torchvision(name, make, data_dir, location(data_dir), download, expected, archive)
        except DataError:  # a failed download (a mistyped --data-dir, say) leaves no empty folders behind
            for folder in (f for f in fresh if f.is_dir()):  # not all of them are made (CIFAR's after unpacking)
                try:
                    folder.rmdir()
                except OSError:  # not empty: a partial file stays beside the error, and its folders
                    break
            raise
        raw = _decode(ds, cls_name)
        bad = torch.nonzero((raw.labels < 0) | (raw.labels >= len(raw.class_names))).flatten()
        if len(bad):  # else a loss or a metric fails with an IndexError, maybe only after training
            raise DatasetUnavailable(f"{name}'s {'training' if train else 'test'} labels in {location(data_dir)} run outside "
                            f"0..{len(raw.class_names) - 1}: {len(bad):,} of {len(raw.labels):,} (the first, "
                            f"{int(raw.labels[bad[0]])}, at item {int(bad[0])}); the files are damaged or not the "
                            "original ones")
        return raw

    return load


def _decode(ds: object, cls_name: str) -> RawImages:
    """Pull the raw arrays out of a torchvision dataset without touching PIL."""
    if cls_name == "SVHN":  # .data is (N, C, H, W) numpy, .labels already maps 10 -> 0
        images = torch.from_numpy(np.ascontiguousarray(ds.data))
        labels = torch.from_numpy(np.asarray(ds.labels, dtype=np.int64))
        return RawImages(images, labels, _SVHN_NAMES)
    if cls_name.startswith("CIFAR"):  # .data is (N, H, W, C) numpy, .targets a list
        images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
    else:  # MNIST family: .data is a (N, H, W) uint8 tensor
        images = ds.data.unsqueeze(1).contiguous()
    labels = torch.as_tensor(ds.targets, dtype=torch.long)
    return RawImages(images, labels, tuple(str(c) for c in ds.classes))
