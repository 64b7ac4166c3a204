import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lstm_model.checkpoint import ModelLoadError, load_model
from lstm_model.cli import main
from tests.factories import make_inputs


class UserNet(nn.Module):
    """What a user trained: their own module with an LSTM (or a GRU) and a linear head."""

    def __init__(
        self, input_size=5, hidden_size=12, num_layers=2, output_size=3, bias=True, cell="lstm"
    ):
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn(input_size, hidden_size, num_layers, batch_first=True, bias=bias)
        self.classifier = nn.Linear(hidden_size, output_size)

    def forward(self, x):
        return self.classifier(self.rnn(x)[0])


def make_user_checkpoint(path, suffix=".pt", seed=3, **net_args):
    torch.manual_seed(seed)
    net = UserNet(**net_args).eval()
    file = path / f"user{suffix}"
    if suffix == ".pt":
        torch.save(net.state_dict(), file)
    else:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(file))
    return net, file


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("bias", [True, False])
def test_import_reproduces_the_users_module(tmp_path, suffix, bias, capsys):
    net, file = make_user_checkpoint(tmp_path, suffix, bias=bias)
    code = main(
        [
            "import",
            str(file),
            "--out",
            str(tmp_path / "m"),
            "--lstm-prefix",
            "rnn.",
            "--head-prefix",
            "classifier.",
        ]
    )
    assert code == 0
    assert "input=5 hidden=12 layers=2 output=3" in capsys.readouterr().out

    loaded = load_model(tmp_path / "m").model
    x = make_inputs(batch=3, steps=9, input_size=5)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x)[0], net(x), atol=1e-6, rtol=0)


def test_import_as_classifier_outputs_the_heads_softmax(tmp_path):
    net, file = make_user_checkpoint(tmp_path)
    main(
        [
            "import",
            str(file),
            "--out",
            str(tmp_path / "m"),
            "--lstm-prefix",
            "rnn.",
            "--head-prefix",
            "classifier.",
            "--kind",
            "classification",
            "--labels",
            "a,b,c",
        ]
    )
    loaded = load_model(tmp_path / "m").model
    assert loaded.config.labels == ("a", "b", "c")
    x = make_inputs(input_size=5)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x)[0], torch.softmax(net(x), -1), atol=1e-6, rtol=0)


def test_import_folds_given_normalisation_into_the_model(tmp_path):
    net, file = make_user_checkpoint(tmp_path, input_size=2)
    main(
        [
            "import",
            str(file),
            "--out",
            str(tmp_path / "m"),
            "--lstm-prefix",
            "rnn.",
            "--head-prefix",
            "classifier.",
            "--mean",
            "1,2",
            "--std",
            "2,4",
        ]
    )
    loaded = load_model(tmp_path / "m").model
    x = make_inputs(input_size=2)
    with torch.inference_mode():
        expected = net((x - torch.tensor([1.0, 2.0])) / torch.tensor([2.0, 4.0]))
        torch.testing.assert_close(loaded(x)[0], expected, atol=1e-6, rtol=0)


def test_wrong_prefix_is_refused_naming_the_keys(tmp_path, capsys):
    _, file = make_user_checkpoint(tmp_path)
    assert main(["import", str(file), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "expected a head weight fc.weight (set --head-prefix)" in err
    assert "classifier.weight" in err


def test_wrong_rnn_prefix_lists_the_keys_present(tmp_path, capsys):
    _, file = make_user_checkpoint(tmp_path)
    args = ["import", str(file), "--out", str(tmp_path / "m"), "--head-prefix", "classifier."]
    assert main([*args, "--rnn-prefix", "encoder."]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lstm-model: ") and len(err.splitlines()) == 1
    assert "expected LSTM or GRU tensors under the prefix 'encoder.' (set --rnn-prefix)" in err
    assert "rnn.weight_ih_l0" in err and "classifier.weight" in err


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_the_cell_is_read_off_the_gate_rows_and_recorded(tmp_path, cell, capsys):
    """No --cell, no prefix: the rnn. module is found and its 4 x or 3 x hidden gate rows say
    LSTM or GRU; config.json records a GRU's cell, and the model equals the user's."""
    net, file = make_user_checkpoint(tmp_path, cell=cell)
    args = ["import", str(file), "--out", str(tmp_path / "m"), "--head-prefix", "classifier."]
    assert main(args) == 0
    assert f"cell={cell} input=5 hidden=12 layers=2 output=3" in capsys.readouterr().out
    loaded = load_model(tmp_path / "m").model
    assert loaded.config.cell == cell
    recorded = json.loads((tmp_path / "m" / "config.json").read_text()).get("cell", "lstm")
    assert recorded == cell
    x = make_inputs(batch=3, steps=9, input_size=5)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x)[0], net(x), atol=1e-6, rtol=0)


def test_a_cell_named_against_the_tensors_is_refused(tmp_path, capsys):
    _, file = make_user_checkpoint(tmp_path, cell="gru")
    args = ["import", str(file), "--out", str(tmp_path / "m"), "--head-prefix", "classifier."]
    assert main([*args, "--cell", "lstm"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert (
        "--cell lstm expects 4 x hidden = 48 gate rows, found 36: the tensors are an nn.GRU" in err
    )


def test_gate_rows_of_neither_cell_are_refused_in_one_line(tmp_path, capsys):
    rnn = nn.RNN(3, 4, batch_first=True)  # one gate block: neither an LSTM nor a GRU
    state = {f"rnn.{k}": v for k, v in rnn.state_dict().items()}
    state |= {"fc.weight": torch.zeros(2, 4), "fc.bias": torch.zeros(2)}
    torch.save(state, tmp_path / "plain.pt")
    assert main(["import", str(tmp_path / "plain.pt"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert (
        "expected an nn.LSTM (4 x hidden = 16 gate rows) or an nn.GRU (3 x hidden = 12), "
        "found weight_ih_l0 with 4 rows for hidden 4"
    ) in err


def test_bidirectional_lstm_is_refused(tmp_path, capsys):
    lstm = nn.LSTM(3, 4, bidirectional=True, batch_first=True)
    state = {f"lstm.{k}": v for k, v in lstm.state_dict().items()}
    state |= {"fc.weight": torch.zeros(2, 4), "fc.bias": torch.zeros(2)}
    torch.save(state, tmp_path / "bi.pt")
    assert main(["import", str(tmp_path / "bi.pt"), "--out", str(tmp_path / "m")]) == 2
    assert "bidirectional" in capsys.readouterr().err


def test_pickled_module_is_refused_not_executed(tmp_path, capsys):
    torch.save(UserNet(), tmp_path / "whole.pt")  # a whole pickled module, not a state dict
    assert main(["import", str(tmp_path / "whole.pt"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "\x1b[" not in err  # one plain line, not torch's
    assert "expected a plain state dict of tensors" in err
    assert f"got a pickled {UserNet.__module__}.UserNet" in err
    assert not (tmp_path / "m").exists()


def test_missing_checkpoint_is_refused(tmp_path):
    from lstm_model.importer import read_state_dict

    with pytest.raises(ModelLoadError, match="no such file"):
        read_state_dict(tmp_path / "absent.pt")
