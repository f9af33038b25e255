"""The model zoo: verified downloads (file:// URLs), nothing partial in the cache, no pickles."""

from __future__ import annotations

import http.server
import shutil
import threading

import pytest
import torch
import yaml

from advprune.bench.zoo import add_to_registry, fetch, load_model, load_registry
from advprune.checkpoint import save_checkpoint, sha256_file
from advprune.cli import main
from advprune.errors import CheckpointError, ConfigError, UnknownNameError
from advprune.models import create

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "LWM_Han2015Learning_DCNN_DIGITS_US_90"


@pytest.fixture()
def served(tmp_path):
    """A real checkpoint 'served' from a folder by file:// URL, and a registry naming it."""
    torch.manual_seed(0)
    model = create("digits_cnn", width=4).eval()
    path = save_checkpoint(tmp_path / "src" / "model.safetensors", model)
    serve = tmp_path / "serve"
    serve.mkdir()
    shutil.copy(path, serve / "m.safetensors")
    registry = tmp_path / "zoo.yaml"
    add_to_registry(registry, KEY, path, (serve / "m.safetensors").as_uri())
    return model, registry, serve / "m.safetensors", tmp_path / "cache"


def cache_content(cache):
    """Every file and folder under the cache (the cache root itself may exist)."""
    return sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*"))


def edit_registry(registry, tmp_path, change, name="edited.yaml"):
    data = yaml.safe_load(registry.read_text())
    change(data)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_load_model_gives_the_same_outputs_and_caches(served):
    model, registry, file, cache = served
    loaded, card = load_model(KEY, registry=registry, cache_dir=cache)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(loaded.eval()(x), model(x))
    assert cache_content(cache) == [KEY, f"{KEY}/model.json", f"{KEY}/model.safetensors"]
    assert card == load_registry(registry)[KEY].card
    assert sha256_file(cache / KEY / "model.safetensors") == sha256_file(file)
    file.unlink()  # a verified cached copy is used without downloading
    again, _ = load_model(KEY, registry=registry, cache_dir=cache)
    assert torch.equal(again.eval()(x), model(x))


def test_truncated_download_rejected_and_nothing_cached(served):
    _, registry, file, cache = served
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="wrong sha256: expected") as info:
        load_model(KEY, registry=registry, cache_dir=cache)
    assert "\n" not in str(info.value)
    assert cache_content(cache) == []  # no temporary file, no partial file, no empty folder


class _Short(http.server.BaseHTTPRequestHandler):
    """Announces the whole file's Content-Length but sends only half of it, then closes."""

    body = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body[: len(self.body) // 2])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_short_read_against_content_length_rejected(served, tmp_path):
    _, registry, file, cache = served
    _Short.body = file.read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Short)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/m.safetensors"
        http_registry = edit_registry(registry, tmp_path, lambda d: d[KEY].update(url=url))
        with pytest.raises(CheckpointError, match=r"truncated: expected \d+ bytes, got \d+"):
            fetch(KEY, registry=http_registry, cache_dir=cache, progress=False)
    finally:
        server.shutdown()
        server.server_close()
    assert cache_content(cache) == []


def test_wrong_sha256_rejected_and_not_cached(served, tmp_path):
    _, registry, file, cache = served
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF  # the served file was altered after the registry was written
    file.write_bytes(bytes(data))
    expected = load_registry(registry)[KEY].sha256
    with pytest.raises(CheckpointError) as info:
        fetch(KEY, registry=registry, cache_dir=cache)
    assert f"expected {expected}, got {sha256_file(file)}" in str(info.value)
    assert cache_content(cache) == []


def test_corrupted_cache_file_is_detected_and_replaced(served):
    model, registry, _, cache = served
    path = fetch(KEY, registry=registry, cache_dir=cache)
    good = sha256_file(path)
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")  # flipped on disk
    (cache / KEY / "model.json").write_text("{}")  # and a damaged card
    loaded, card = load_model(KEY, registry=registry, cache_dir=cache)
    assert sha256_file(path) == good and card["tensors"]["sha256"] == good
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(loaded.eval()(x), model(x))


def test_registry_must_match_its_cards(served, tmp_path):
    _, registry, _, _ = served

    def other_hash(d):
        d[KEY]["sha256"] = "0" * 64

    with pytest.raises(ConfigError, match=f"entry {KEY}: the card's tensors.sha256") as info:
        load_registry(edit_registry(registry, tmp_path, other_hash))
    assert "\n" not in str(info.value)

    def other_arch(d):
        d["LWM_Han2015Learning_R18_DIGITS_US_90"] = d.pop(KEY)

    with pytest.raises(ConfigError, match=r"holds a 'digits_cnn' model but .* R18 is 'resnet18'"):
        load_registry(edit_registry(registry, tmp_path, other_arch))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update({"not_a_key": d[KEY]}), "entry not_a_key: model key"),
        (lambda d: d[KEY].update(sha256="abc"), f"entry {KEY}: sha256: must be 64 hex"),
        (lambda d: d[KEY].update(url="ftp://x/y"), f"entry {KEY}: url: must be a file://"),
        (lambda d: d[KEY].update(extra=1), f"entry {KEY}: extra: Extra inputs"),
        (lambda d: d[KEY].pop("card"), f"entry {KEY}: card: Field required"),
        (lambda d: d[KEY]["card"].update(format="x"), f"entry {KEY}: card: must be an advprune"),
        (lambda d: d.update({KEY: "http://x"}), f"entry {KEY}: must be a mapping"),
    ],
)
def test_malformed_registry_is_one_line_naming_the_entry(served, tmp_path, change, message):
    _, registry, _, _ = served
    with pytest.raises(ConfigError, match=message) as info:
        load_registry(edit_registry(registry, tmp_path, change))
    assert "\n" not in str(info.value)


def test_registry_file_errors(served, tmp_path):
    _, registry, _, _ = served
    text = registry.read_text()
    twice = tmp_path / "twice.yaml"
    twice.write_text(text + text[text.index(f"\n{KEY}:") :])  # the same entry again
    assert text.count(f"\n{KEY}:") == 1 and twice.read_text().count(f"\n{KEY}:") == 2
    with pytest.raises(ConfigError, match=f"{KEY} is given twice"):
        load_registry(twice)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must map model keys to entries"):
        load_registry(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [\n")
    with pytest.raises(ConfigError, match="cannot read zoo registry"):
        load_registry(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="cannot read zoo registry"):
        load_registry(tmp_path / "absent.yaml")


def test_packaged_registry_and_environment(served, monkeypatch, tmp_path):
    _, registry, _, _ = served
    monkeypatch.delenv("ADVPRUNE_ZOO", raising=False)
    assert load_registry() == {}  # the packaged registry is valid and has no entries
    monkeypatch.setenv("ADVPRUNE_ZOO", str(registry))
    monkeypatch.setenv("ADVPRUNE_CACHE", str(tmp_path / "envcache"))
    assert list(load_registry()) == [KEY]
    assert fetch(KEY) == tmp_path / "envcache" / KEY / "model.safetensors"


def test_unknown_key_lists_the_available_ones(served):
    _, registry, _, cache = served
    with pytest.raises(UnknownNameError, match=f"unknown zoo model 'nope'; valid .*: {KEY}"):
        load_model("nope", registry=registry, cache_dir=cache)


class Boom:
    """Unpickling this creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_is_never_unpickled(served, tmp_path):
    _, registry, _, cache = served
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"x": Boom(str(marker))}, evil)
    assert not marker.exists()

    def serve_pickle(d):  # an entry whose url, sha256 and card hash all name the pickle
        d[KEY].update(url=evil.as_uri(), sha256=sha256_file(evil))
        d[KEY]["card"]["tensors"]["sha256"] = sha256_file(evil)

    bad = edit_registry(registry, tmp_path, serve_pickle)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(KEY, registry=bad, cache_dir=cache)
    assert not marker.exists()
    # and with the original registry, the pickle fails the hash before anything reads it
    pointed = edit_registry(registry, tmp_path, lambda d: d[KEY].update(url=evil.as_uri()))
    with pytest.raises(CheckpointError, match="wrong sha256"):
        load_model(KEY, registry=pointed, cache_dir=tmp_path / "cache2")
    assert not marker.exists() and cache_content(tmp_path / "cache2") == []
    torch.load(evil, weights_only=False)["x"].close()  # the marker works when unpickled
    assert marker.exists()


def test_add_to_registry(served, tmp_path):
    _, registry, _, _ = served
    second = save_checkpoint(tmp_path / "b" / "model.safetensors", create("digits_cnn", width=2))
    key2 = "HYDRA_Sehwag2020Hydra_DCNN_DIGITS_US_99"
    entry = add_to_registry(registry, key2, second, "https://example.org/b.safetensors")
    entries = load_registry(registry)
    assert list(entries) == [key2, KEY] and entries[key2] == entry
    assert entry.sha256 == sha256_file(second) == entry.card["tensors"]["sha256"]
    assert registry.read_text().startswith("# advprune model zoo registry")
    before = registry.read_text()
    with pytest.raises(ConfigError, match="R18 is 'resnet18'"):
        add_to_registry(registry, "HYDRA_Sehwag2020Hydra_R18_DIGITS_US_99", second, "file:///x")
    with pytest.raises(ConfigError, match="url: must be"):
        add_to_registry(registry, key2, second, "ftp://example.org/b")
    second.write_bytes(second.read_bytes()[:-1] + b"\x00")  # the tensors no longer match the card
    with pytest.raises(CheckpointError, match="does not match the card"):
        add_to_registry(registry, key2, second, "https://example.org/b.safetensors")
    assert registry.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_cli(served, capsys, monkeypatch, tmp_path):
    _, registry, file, cache = served
    monkeypatch.setenv("ADVPRUNE_ZOO", str(registry))
    assert main(["zoo", "list"]) == 0
    assert f"{KEY}  digits_cnn  sha256 " in capsys.readouterr().out
    assert main(["zoo", "get", KEY, "--cache", str(cache)]) == 0
    assert capsys.readouterr().out.strip() == str(cache / KEY / "model.safetensors")
    assert main(["zoo", "get", "nope", "--cache", str(cache)]) == 2
    assert capsys.readouterr().err.startswith("error: unknown zoo model 'nope'")
    other = tmp_path / "other.yaml"
    key2 = "LWM_Han2015Learning_DCNN_DIGITS_US_95"
    src = tmp_path / "src" / "model.safetensors"
    assert (
        main(["zoo", "add", key2, str(src), "--url", file.as_uri(), "--registry", str(other)]) == 0
    )
    assert f"added {key2}" in capsys.readouterr().out
    assert main(["zoo", "list", "--registry", str(other)]) == 0
    assert key2 in capsys.readouterr().out
    file.write_bytes(file.read_bytes()[:100])
    args = ["zoo", "get", key2, "--registry", str(other), "--cache", str(tmp_path / "c2")]
    assert main(args) == 2
    err = capsys.readouterr().err.split("\r")[-1]  # after the progress bar
    assert err.startswith("error: download of") and err.count("\n") == 1
    assert cache_content(tmp_path / "c2") == []
