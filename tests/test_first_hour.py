"""What a new user met in the first hour: each message says the real cause and what to do."""

from __future__ import annotations

import socket

import pytest

HUB_REPO = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"


def _failing_download(error: BaseException):
    def download(*args, **kwargs):
        raise error
    return download


@pytest.fixture
def no_network(monkeypatch):
    """open_clip's Hub download fails as it does without a network (name resolution)."""
    pytest.importorskip("open_clip")
    import open_clip.pretrained

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", _failing_download(
        socket.gaierror(-3, "Temporary failure in name resolution")))


def test_weights_failure_without_network_says_so_and_names_the_hub_file(no_network):
    from clipinspect.export.clip import WeightsDownloadError, load_clip
    from clipinspect.export.demo import weights_warning

    with pytest.raises(WeightsDownloadError) as caught:
        load_clip("ViT-B-32", "laion2b_s34b_b79k")
    message = str(caught.value)
    assert "\n" not in message and "no network connection" in message
    assert HUB_REPO in message and "open_clip_pytorch_model.bin" in message
    assert "--pretrained PATH" in message and caught.value.offline
    warning = weights_warning("ViT-B-32", "laion2b_s34b_b79k", caught.value)
    assert "\n" not in warning and "no network connection" in warning and HUB_REPO in warning
    assert "open_clip_model.safetensors" in warning and "RANDOM" in warning


def test_weights_failure_in_offline_mode_says_offline(no_network, monkeypatch):
    from clipinspect.export.clip import WeightsDownloadError, load_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsDownloadError, match="offline mode.*HF_HUB_OFFLINE"):
        load_clip("ViT-B-32", "laion2b_s34b_b79k")


def test_weights_failure_for_another_cause_names_that_cause(monkeypatch):
    pytest.importorskip("open_clip")
    import open_clip.pretrained

    from clipinspect.export.clip import WeightsDownloadError, load_clip

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", _failing_download(
        PermissionError(13, "Permission denied: '/cache/models--laion'")))
    with pytest.raises(WeightsDownloadError) as caught:
        load_clip("ViT-B-32", "laion2b_s34b_b79k")
    message = str(caught.value)
    assert "no network" not in message and not caught.value.offline
    assert "PermissionError" in message and "Permission denied" in message and HUB_REPO in message
