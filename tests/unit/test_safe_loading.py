"""Safe loading: checkpoints load with ``torch.load(weights_only=True)`` (or from safetensors),
``trust_remote_code`` stays off unless the user sets it, and no config value is ever run as code."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from eagrl.cli import main
from tests.conftest import REPO

SOURCES = sorted(p for d in ("eagrl", "lightning_modules", "datamodules", "benchmarks") for p in (REPO / d).rglob("*.py"))
CONCARE = ["fit", "--config", "configs/tjh/concare.yaml", "--config", "configs/smoke/concare.yaml"]


@pytest.fixture(autouse=True)
def _in_process(monkeypatch):
    monkeypatch.setattr("sys.argv", ["python -m eagrl"])
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_every_torch_load_in_the_code_is_weights_only():
    found = []
    for path in SOURCES:
        for call, name in _calls(path):
            if name == "torch.load":
                flags = {k.arg: k.value for k in call.keywords}
                ok = isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True
                found.append((path.name, call.lineno, ok))
    assert found, "no torch.load found: the scan is broken"
    assert all(ok for *_, ok in found), [f for f in found if not f[2]]


def test_nothing_unpickles_evaluates_or_trusts_remote_code():
    banned = {"eval", "exec", "pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load", "marshal.loads", "compile"}
    bad = []
    for path in SOURCES:
        for call, name in _calls(path):
            if name in banned:
                bad.append(f"{path.relative_to(REPO)}:{call.lineno} {name}")
            for keyword in call.keywords:
                if keyword.arg == "trust_remote_code" and not (isinstance(keyword.value, ast.Constant) and keyword.value.value is False):
                    if "options.trust_remote_code" not in ast.unparse(keyword.value):
                        bad.append(f"{path.relative_to(REPO)}:{call.lineno} trust_remote_code={ast.unparse(keyword.value)}")
    assert not bad, bad
    assert "register_new_resolver" not in "".join(p.read_text() for p in SOURCES)  # no custom OmegaConf resolvers


def test_trust_remote_code_is_off_unless_set():
    from eagrl.models.backbone import BackboneOptions, _pretrained_kwargs

    assert BackboneOptions().trust_remote_code is False
    assert _pretrained_kwargs(BackboneOptions(name="some/model"), torch.float32)["trust_remote_code"] is False
    shipped = [p for p in (REPO / "configs").rglob("*.yaml") if "trust_remote_code: true" in p.read_text()]
    assert not shipped


def test_the_cli_loads_checkpoints_weights_only_by_default(capsys):
    with pytest.raises(SystemExit):
        main([*CONCARE, "--print_config"])
    assert "weights_only: true" in capsys.readouterr().out


class _RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_a_checkpoint_that_carries_code_is_refused_and_never_run(capsys, tmp_path):
    payload = _RunsCode()
    payload.target = str(tmp_path / "the-code-ran")
    torch.save({"state_dict": {}, "payload": payload}, tmp_path / "evil.ckpt")
    with pytest.raises(SystemExit) as stop:
        main([*CONCARE, "--trainer.default_root_dir", str(tmp_path / "run"), "--ckpt_path", str(tmp_path / "evil.ckpt")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "holds objects other than tensors and plain values" in err
    assert not (tmp_path / "the-code-ran").exists()


def test_a_yaml_tag_that_would_run_code_is_refused(capsys, tmp_path):
    target = tmp_path / "the-code-ran"
    text = (REPO / "configs/tjh/concare.yaml").read_text()
    text = text.replace("    lr: 0.001", f"    lr: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{target}']]")
    (tmp_path / "evil.yaml").write_text(text)
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(tmp_path / "evil.yaml"), "--print_config"])
    assert stop.value.code == 2 and not target.exists()


@pytest.mark.parametrize("value", ["${python:__import__('os').system('touch X')}", "__import__('os').system('touch X')"])
def test_a_config_value_is_never_evaluated(capsys, tmp_path, value, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main([*CONCARE, "--trainer.default_root_dir", value, "--print_config"])
    assert not (tmp_path / "X").exists()


def test_a_class_path_outside_the_expected_base_class_is_refused(capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        main([*CONCARE, "--model.class_path", "os.system", "--print_config"])
    assert stop.value.code == 2


def test_a_zip_that_is_not_a_checkpoint_is_one_clear_error(capsys, tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "notes.ckpt", "w") as archive:
        archive.writestr("notes.txt", "not a checkpoint")
    with pytest.raises(SystemExit) as stop:
        main([*CONCARE, "--trainer.default_root_dir", str(tmp_path / "run"), "--ckpt_path", str(tmp_path / "notes.ckpt")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "is not a PyTorch checkpoint that can be read" in err and "Traceback" not in err


@pytest.mark.parametrize("header", [b"[1, 2]", b"12", b"{not json"])
def test_a_safetensors_header_that_is_not_an_object_is_reported(tmp_path, header):
    import struct

    from eagrl.errors import EAGRLInputError
    from eagrl.io import check_safetensors

    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(EAGRLInputError, match="not a complete safetensors file"):
        check_safetensors(path, "backbone.name")


def test_the_random_state_round_trips_through_a_checkpoint():
    import random

    import numpy as np

    from eagrl.callbacks import RandomState

    callback = RandomState()
    state = callback.state_dict()
    torch.save(state, "/dev/null")  # tensors and plain values only
    drawn = (torch.rand(3), np.random.rand(), random.random())
    callback.load_state_dict(state)
    again = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(drawn[0], again[0]) and drawn[1:] == again[1:]
    callback.load_state_dict(state["ranks"][0])  # a checkpoint of one process, before the per-rank list
    assert torch.equal(torch.rand(3), drawn[0])


def test_a_damaged_cached_conversion_is_reported_and_converted_again(tmp_path, caplog):
    """The converted SmolLM2 in the model cache, cut short: noticed (and logged) before loading."""
    from eagrl.models.backbone import _intact

    folder = tmp_path / "smollm2-135m-instruct"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(64, 64)}, str(folder / "model.safetensors"))
    assert _intact(folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 100])
    with caplog.at_level("WARNING"):
        assert not _intact(folder)
    assert "not a complete safetensors file" in caplog.text and "converting again" in caplog.text


def test_processes_sharing_a_cache_convert_once_under_a_lock(tmp_path, tokenizer, monkeypatch):
    """While another process holds the conversion lock, a load waits; when that one has published the tokenizer,
    the waiting load reads it instead of converting (and replacing the folder under a reader) again."""
    import threading

    from filelock import FileLock

    from eagrl.models import backbone

    published, converting = [], []
    monkeypatch.setattr(backbone, "_publish", lambda *args: published.append(args))
    real_check = backbone.check_gguf
    monkeypatch.setattr(backbone, "check_gguf", lambda path: converting.append(path) or real_check(path))  # a conversion's first step
    folder = tmp_path / "smollm2-135m-instruct-tokenizer"
    loaded = []
    with FileLock(str(tmp_path / f".{folder.name}.lock")):  # "another process" is converting
        waiting = threading.Thread(target=lambda: loaded.append(backbone.embedded_tokenizer(backbone.BackboneOptions(cache_dir=str(tmp_path)))), daemon=True)
        waiting.start()
        waiting.join(timeout=1.0)
        assert waiting.is_alive() and not loaded and not converting  # it waits for the lock, not converting
        tokenizer.save_pretrained(folder)  # the other process's result, complete with its manifest
        (folder / "eagrl_manifest.json").write_text(json.dumps({"version": backbone.CONVERSION_VERSION, "what": "tokenizer"}))
    waiting.join(timeout=60)
    assert loaded and loaded[0].vocab_size == tokenizer.vocab_size
    assert published == [] and converting == []  # read, not converted again
