"""Downloads against a server that accepts the connection and never answers: each gives up after
SSVI_NETWORK_TIMEOUT seconds with one line, instead of hanging the run."""

import socket

import pytest
import torch
import torchvision

from ssvi_cli.config import ConfigError
from ssvi_cli.data.sources import load_raw
from ssvi_cli.data.spec import DataError
from ssvi_cli.cli import run
from ssvi_cli.network import NetworkSettingError, stall_seconds
from ssvi_cli.training.pretrained import fetch_state_dict

from hang_guard import time_bound

GUARD_SECONDS = 60  # the test fails, rather than hangs, if the limit does not work


@pytest.fixture
def silent_server(monkeypatch):
    """An HTTP address whose connections the kernel accepts and nobody ever answers."""
    monkeypatch.setenv("SSVI_NETWORK_TIMEOUT", "1")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


class _Weights:
    """Stands for a torchvision WeightsEnum member whose URL is the silent server."""

    def __init__(self, url: str) -> None:
        self.url = url

    def get_state_dict(self, **kwargs):
        return torch.hub.load_state_dict_from_url(self.url, **kwargs)

    def __repr__(self) -> str:
        return "ResNet18_Weights.SILENT"


def test_a_stalled_weights_download_is_one_line(silent_server, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    with time_bound(GUARD_SECONDS), pytest.raises(ConfigError) as err:
        fetch_state_dict(_Weights(f"{silent_server}/resnet18-f37072fd.pth"))
    message = str(err.value)
    assert "cannot download" in message and "timed out" in message and "\n" not in message
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert socket.getdefaulttimeout() is None  # the limit is lifted afterwards


def test_a_stalled_dataset_download_is_one_line(silent_server, tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [f"{silent_server}/"])
    with time_bound(GUARD_SECONDS), pytest.raises(DataError) as err:
        load_raw("mnist", data_dir=tmp_path, download=True)
    message = str(err.value)
    assert "mnist" in message and "timed out" in message and "\n" not in message
    assert socket.getdefaulttimeout() is None


@pytest.mark.parametrize("value, seconds", [("", 60.0), ("5", 5.0), (" 0.5 ", 0.5), ("0", None), ("none", None),
                                            ("OFF", None)])
def test_the_stall_limit_reads_its_environment_variable(monkeypatch, value, seconds):
    monkeypatch.setenv("SSVI_NETWORK_TIMEOUT", value)
    assert stall_seconds() == seconds


@pytest.mark.parametrize("value", ["soon", "-3", "inf", "1e300", "nan"])
def test_a_bad_stall_limit_is_one_line_before_any_download(monkeypatch, tmp_path, capsys, value):
    monkeypatch.setenv("SSVI_NETWORK_TIMEOUT", value)
    with pytest.raises(NetworkSettingError, match="SSVI_NETWORK_TIMEOUT=.*give the seconds"):
        stall_seconds()
    code = run(["train", "--data", "mnist", "--download", "--data-dir", str(tmp_path), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: SSVI_NETWORK_TIMEOUT=") and len(err.strip().splitlines()) == 1
    assert socket.getdefaulttimeout() is None
