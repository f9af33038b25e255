"""The model zoo: verified downloads (file:// URLs), nothing partial in the cache, no pickles."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from advprune.bench.zoo import add_to_registry, fetch, load_model, load_registry
from advprune.checkpoint import save_checkpoint, sha256_file
from advprune.cli import main
from advprune.errors import CheckpointError, ConfigError, UnknownNameError
from advprune.models import create

KEY = "LWM_Han2015Learning_DCNN_DIGITS_US_90"


@pytest.fixture()
def served(tmp_path):
    """A real checkpoint 'served' from a folder, and a registry naming it."""
    torch.manual_seed(0)
    model = create("digits_cnn", width=4).eval()
    path = save_checkpoint(tmp_path / "src" / "model.safetensors", model)
    serve = tmp_path / "serve"
    serve.mkdir()
    shutil.copy(path, serve / "m.safetensors")
    registry = tmp_path / "zoo.yaml"
    add_to_registry(registry, KEY, path, (serve / "m.safetensors").as_uri())
    return model, registry, serve / "m.safetensors", tmp_path / "cache"


def cache_files(cache):
    return sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file())


def test_load_model_equal_outputs_and_cache(served):
    model, registry, _, cache = served
    loaded, card = load_model(KEY, registry=registry, cache=cache)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(loaded.eval()(x), model(x))
    assert cache_files(cache) == [f"{KEY}/model.json", f"{KEY}/model.safetensors"]
    assert card["tensors"]["sha256"] == load_registry(registry)[KEY].sha256


def test_truncated_download_rejected_and_nothing_cached(served):
    _, registry, file, cache = served
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"sha256|truncated"):
        load_model(KEY, registry=registry, cache=cache)
    assert cache_files(cache) == []


def test_altered_file_rejected(served):
    _, registry, file, cache = served
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="expected"):
        fetch(KEY, registry=registry, cache=cache)
    assert cache_files(cache) == []


def test_corrupted_cache_replaced(served):
    _, registry, _, cache = served
    path = fetch(KEY, registry=registry, cache=cache)
    good = sha256_file(path)
    path.write_bytes(b"garbage")
    assert sha256_file(fetch(KEY, registry=registry, cache=cache)) == good


def test_registry_errors(served, tmp_path):
    _, registry, _, cache = served
    with pytest.raises(UnknownNameError, match="zoo model"):
        load_model("HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_90", registry=registry, cache=cache)
    data = yaml.safe_load(registry.read_text())
    data[KEY]["sha256"] = "0" * 64
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="card's tensor sha256"):
        load_registry(bad)
    bad.write_text(yaml.safe_dump({"not_a_key": data[KEY]}))
    with pytest.raises(ConfigError, match="model key"):
        load_registry(bad)
    bad.write_text(yaml.safe_dump({KEY: {"url": "x", "sha256": "abc", "card": {}}}))
    with pytest.raises(ConfigError, match=f"entry {KEY}: sha256"):
        load_registry(bad)
    assert load_registry() == {}  # the packaged registry is valid and empty


class Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_never_unpickled(served, tmp_path):
    _, registry, _, cache = served
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"x": Boom(str(marker))}, evil)
    assert not marker.exists()
    data = yaml.safe_load(registry.read_text())
    data[KEY].update(url=evil.as_uri(), sha256=sha256_file(evil))
    data[KEY]["card"]["tensors"]["sha256"] = sha256_file(evil)
    registry.write_text(yaml.safe_dump(data))
    with pytest.raises(CheckpointError):
        load_model(KEY, registry=registry, cache=cache)  # hash matches: safetensors refuses
    assert not marker.exists()


def test_cli(served, capsys, monkeypatch):
    _, registry, _, cache = served
    monkeypatch.setenv("ADVPRUNE_ZOO", str(registry))
    assert main(["zoo", "list"]) == 0 and KEY in capsys.readouterr().out
    assert main(["zoo", "get", KEY, "--cache", str(cache)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"{KEY}/model.safetensors")
    assert main(["zoo", "get", "nope", "--cache", str(cache)]) == 2
    assert "unknown zoo model" in capsys.readouterr().err
