"""Autoencoder loading: local-looking sources are never hub ids; an unreachable hub fails fast.

No test here touches the network: sockets are blocked and the hub probe is monkeypatched.
"""

from __future__ import annotations

import socket

import pytest

import patchforcing.autoencoders as ae_module
from patchforcing.autoencoders import AutoencoderError, AutoencoderSpec, load_autoencoder
from patchforcing.utils.hub import HubError

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE")


def _block_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in the tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _no_probe(*args, **kwargs):
    raise AssertionError("a local-looking VAE source was looked up on the hub")


@pytest.mark.parametrize("source", ["vaes/sd-vae.safetensors", "weights/vae.bin", "./vae", "~/no/such/vae"])
def test_local_looking_vae_source_is_never_a_hub_id(monkeypatch, source):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(ae_module, "probe_hub_file", _no_probe, raising=False)
    _block_network(monkeypatch)
    with pytest.raises(AutoencoderError) as err:
        load_autoencoder(AutoencoderSpec(kind="kl", source=source, scale_factor=0.18215))
    assert str(err.value).startswith(f"cannot load the VAE {source!r}: no such directory. Download it once with")


def test_unreachable_hub_vae_fails_fast_naming_the_repo(monkeypatch):
    pytest.importorskip("diffusers")
    for var in _OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    calls = []

    def probe(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        raise HubError("the hub is unreachable (ConnectError); set HF_HUB_OFFLINE=1 to use the cache only")

    monkeypatch.setattr(ae_module, "probe_hub_file", probe, raising=False)
    _block_network(monkeypatch)
    with pytest.raises(AutoencoderError) as err:
        load_autoencoder(AutoencoderSpec(kind="kl", source="nobody/no-such-vae", scale_factor=0.18215))
    assert str(err.value).startswith(
        "cannot load the VAE 'nobody/no-such-vae': not a local directory; tried hub repo 'nobody/no-such-vae': "
        "the hub is unreachable (ConnectError)"
    )
    assert "hf download nobody/no-such-vae --local-dir DIR" in str(err.value)
    assert calls == [("nobody/no-such-vae", "config.json")]


def test_offline_hub_vae_is_not_probed(monkeypatch):
    pytest.importorskip("diffusers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(ae_module, "probe_hub_file", _no_probe, raising=False)
    _block_network(monkeypatch)
    with pytest.raises(AutoencoderError, match="'nobody/no-such-vae': offline and not in the Hugging Face cache"):
        load_autoencoder(AutoencoderSpec(kind="kl", source="nobody/no-such-vae", scale_factor=0.18215))
