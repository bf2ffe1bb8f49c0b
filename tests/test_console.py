"""What the command line tells a user: hints for a mistyped override, the train summary."""

import pytest

from bytelm.cli import main as bytelm


@pytest.mark.parametrize("argv, hint", [
    (["train", "--run-dir", "r", "--set", "model.n_future", "8"], "write --set model.n_future=8"),
    (["sweep", "s.yaml", "--set", "train.steps", "--dry-run"], "write --set train.steps=VALUE"),
    (["train", "--run-dir", "r", "--tag", "owner", "me"], "write --tag owner=me"),
])
def test_an_override_with_a_space_gets_a_hint(argv, hint, capsys):
    with pytest.raises(SystemExit) as e:
        bytelm(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(hint) and "KEY=VALUE" in err and err.count("\n") == 0


def test_progress_text_says_what_the_loss_is():
    from bytelm.train import progress_text

    row = {"loss": 24.5, "loss/head_1": 3.1, "bytes_per_s": 1520.0}
    assert progress_text(row, 8) == "loss 24.500 = sum of 8 heads, head 1 3.100 (nats/token), 1.52e+03 bytes/s"
    assert progress_text(row, 1) == "loss 24.500 (nats/token), 1.52e+03 bytes/s"
