"""A model repository (REPO/NAME/VERSION/): init and import write a version where --out says,
publish adds the next version atomically, and a broken model directory is refused whole."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from lstm_model import repository
from lstm_model.checkpoint import load_model
from lstm_model.cli import main
from tests.factories import make_model_dir
from tests.lstm_model.test_importer import make_user_checkpoint

INIT = ["init", "--input-size", "2", "--hidden-size", "3", "--num-layers", "1"]
INIT += ["--output-size", "2"]


def identity(model_dir) -> tuple[str, str]:
    config = json.loads((model_dir / "config.json").read_text())
    return config["name"], config["version"]


def test_init_into_a_repository_takes_name_and_version_from_the_path(tmp_path, capsys):
    out = tmp_path / "repo" / "m" / "3"
    assert main([*INIT, "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: m v3 cell=lstm input=2 ")
    loaded = load_model(out).model.config
    assert (loaded.name, loaded.version) == ("m", "3")


def test_init_elsewhere_or_with_a_name_is_as_before(tmp_path):
    assert main([*INIT, "--out", str(tmp_path / "plain")]) == 0
    assert identity(tmp_path / "plain") == ("random", "1")
    assert main([*INIT, "--out", str(tmp_path / "repo" / "m" / "0")]) == 0  # not a version
    assert identity(tmp_path / "repo" / "m" / "0") == ("random", "1")
    named = tmp_path / "repo" / "m" / "4"
    assert main([*INIT, "--out", str(named), "--name", "other", "--version", "9"]) == 0
    assert identity(named) == ("other", "9")
    assert main([*INIT, "--out", str(tmp_path / "v"), "--version", "2"]) == 0
    assert identity(tmp_path / "v") == ("random", "2")


def test_import_into_a_repository_takes_name_and_version_from_the_path(tmp_path, capsys):
    _, file = make_user_checkpoint(tmp_path)
    out = tmp_path / "repo" / "user-net" / "12"
    prefixes = ["--lstm-prefix", "rnn.", "--head-prefix", "classifier."]
    assert main(["import", str(file), "--out", str(out), *prefixes]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: user-net v12 cell=lstm input=5 ")
    assert identity(out) == ("user-net", "12")
    plain = tmp_path / "plain"
    assert main(["import", str(file), "--out", str(plain), *prefixes]) == 0
    assert identity(plain) == ("user", "1")  # the checkpoint's file name, as before


def test_publish_twice_adds_versions_1_and_2(tmp_path, capsys):
    source = make_model_dir(tmp_path / "src", input_size=3, hidden_size=5, output_size=2)
    repo = tmp_path / "repo"
    source_model = load_model(source).model
    for version in (1, 2):
        assert main(["publish", str(source), "--repository", str(repo), "--name", "m"]) == 0
        target = repo / "m" / str(version)
        out = capsys.readouterr().out.strip()
        assert out == f"published {source} as m v{version}: {target}"
        loaded = load_model(target).model
        assert (loaded.config.name, loaded.config.version) == ("m", str(version))
        for name, tensor in source_model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
    assert sorted(os.listdir(repo / "m")) == ["1", "2"]  # no temp directory left


def test_publish_names_the_version_after_the_config_by_default(tmp_path):
    source = make_model_dir(tmp_path / "src")  # init_model's name: random
    (tmp_path / "repo" / "random" / "7").mkdir(parents=True)
    (tmp_path / "repo" / "random" / "notes").mkdir()  # not a version
    assert main(["publish", str(source), "--repository", str(tmp_path / "repo")]) == 0
    assert identity(tmp_path / "repo" / "random" / "8") == ("random", "8")


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "plain-rename"])
def test_a_version_taken_meanwhile_is_left_alone_and_the_next_is_used(
    tmp_path, monkeypatch, renameat2
):
    if not renameat2:
        monkeypatch.setattr(repository, "_renameat2", lambda source, target: False)
    source = make_model_dir(tmp_path / "src")
    taken = tmp_path / "repo" / "m" / "1"
    taken.mkdir(parents=True)  # empty: a plain rename would replace it
    looks = []
    real = repository.versions

    def versions(model_dir):  # the first look misses it, as if it came just after
        looks.append(model_dir)
        return [] if len(looks) == 1 else real(model_dir)

    monkeypatch.setattr(repository, "versions", versions)
    target, version = repository.publish(source, tmp_path / "repo", "m")
    assert (target, version) == (tmp_path / "repo" / "m" / "2", 2)
    assert list(taken.iterdir()) == []
    assert identity(target) == ("m", "2")


def test_the_new_version_is_readable_as_the_umask_says(tmp_path):
    source = make_model_dir(tmp_path / "src")
    previous = os.umask(0o022)
    try:
        target, _ = repository.publish(source, tmp_path / "repo", "m")
    finally:
        os.umask(previous)
    assert target.stat().st_mode & 0o777 == 0o755
    for name in ("config.json", "model.safetensors"):
        assert (target / name).stat().st_mode & 0o777 == 0o644, name


def broken_without_weights(path):
    make_model_dir(path)
    (path / "model.safetensors").unlink()
    return "model.safetensors: no such file"


def broken_by_a_wrong_shape(path):
    make_model_dir(path, input_size=4, hidden_size=16, num_layers=1, output_size=3)
    tensors = load_model(path).model.state_dict()
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    tensors["head.weight"] = torch.zeros(3, 8)
    save_file(tensors, str(path / "model.safetensors"))
    return "tensor head.weight has shape [3, 8], expected [3, 16]"


@pytest.mark.parametrize("breakage", [broken_without_weights, broken_by_a_wrong_shape])
def test_a_broken_model_dir_is_refused_and_nothing_is_left_behind(tmp_path, capsys, breakage):
    source = tmp_path / "src"
    problem = breakage(source)
    repo = tmp_path / "repo"
    assert main(["publish", str(source), "--repository", str(repo), "--name", "m"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lstm-model: {source}")
    assert problem in err
    assert not repo.exists()


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", ".."])
def test_a_name_that_is_no_directory_name_is_refused(tmp_path, capsys, name):
    source = make_model_dir(tmp_path / "src")
    with pytest.raises(repository.PublishError, match="expected a plain directory name"):
        repository.check_name(name)
    if name:
        assert main(["publish", str(source), "--repository", str(tmp_path / "r"), "--name", name])
        assert "expected a plain directory name" in capsys.readouterr().err
        assert not (tmp_path / "r").exists()
