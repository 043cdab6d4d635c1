"""Bad command lines end as one ``error:`` line naming the option or key, exit status 2, no
traceback, before any work: config values (--set, --config), counts, --device, --out."""
from pathlib import Path

import pytest
import torch

from maskrcnn.cli import main


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "taken"
    path.write_text("not a folder\n")
    return path


def error_line(capsys, argv) -> str:
    """The single stderr line of ``maskrcnn ARGV`` (asserting exit status 2 and nothing else)."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def train(out, *args):
    return ["train", "--shapes", "2", "--out", str(out), "--workers", "0", "--device", "cpu", *args]


SET_CASES = [
    ("learning_rate=nan", "error: learning_rate='nan' must be a finite number"),
    ("learning_rate=.inf", "error: learning_rate=inf must be a finite number"),
    ("learning_rate=abc", "error: learning_rate='abc' must be a finite number"),
    ("learning_rate=-1", "error: learning_rate=-1 must be a finite number > 0"),
    ("train_bn=maybe", "error: train_bn='maybe' must be true or false"),
    ("rpn_anchor_scales=5", "error: rpn_anchor_scales=5 must be a list of finite numbers"),
    ("images_per_gpu=two", "error: images_per_gpu='two' must be an integer"),
    ("mask_shape=[28]", "error: mask_shape=(28,) must be a list of 2 integers"),
    ("no_such_key=1", "error: unknown config key 'no_such_key'"),
    ("num_classes", "error: --set: expected KEY=VALUE, got 'num_classes'"),
]


@pytest.mark.parametrize("assignment, message", SET_CASES)
def test_bad_set_value(tmp_path, capsys, assignment, message):
    assert error_line(capsys, train(tmp_path / "run", "--set", assignment)).startswith(message)
    assert not (tmp_path / "run").exists()


def test_one_key_value_per_set(tmp_path, capsys):
    err = error_line(capsys, train(tmp_path / "run", "--set", "learning_rate=0.01", "warmup_steps=2"))
    assert err.startswith("error: unrecognized arguments: warmup_steps=2 (one KEY=VALUE per --set")


def test_bad_config_file_names_file_and_key(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("learning_rate: -0.5\n")
    err = error_line(capsys, train(tmp_path / "run", "--config", str(tmp_path / "c.yaml")))
    assert err == f"error: {tmp_path / 'c.yaml'}: learning_rate=-0.5 must be a finite number > 0"
    err = error_line(capsys, train(tmp_path / "run", "--config", str(tmp_path / "missing.yaml")))
    assert err.startswith(f"error: {tmp_path / 'missing.yaml'}: cannot read config")


@pytest.mark.parametrize("argv, message", [
    (["--steps", "-5"], "error: --steps: must be an integer >= 0, got '-5'"),
    (["--steps", "abc"], "error: --steps: must be an integer >= 0, got 'abc'"),
    (["--checkpoint-every", "0"], "error: --checkpoint-every: must be an integer >= 1, got '0'"),
    (["--keep", "-1"], "error: --keep: must be an integer >= 1"),
    (["--workers", "-2"], "error: --workers: must be an integer >= 0"),
    (["--seed", "x"], "error: --seed: must be an integer >= 0"),
    (["--layers", "some"], "error: --layers: invalid choice: 'some'"),
])
def test_bad_train_counts(tmp_path, capsys, argv, message):
    assert error_line(capsys, train(tmp_path / "run", *argv)).startswith(message)


@pytest.mark.parametrize("argv, message", [
    (["demo", "--out", "{tmp}/d", "--minutes", "0"], "error: --minutes: must be a number > 0, got '0'"),
    (["demo", "--out", "{tmp}/d", "--minutes", "nan"], "error: --minutes: must be a number > 0, got 'nan'"),
    (["detect", "--weights", "m", "--batch-size", "0", "a.png"], "error: --batch-size: must be an integer >= 1"),
    (["evaluate", "--weights", "m", "--limit", "0"], "error: --limit: must be an integer >= 1"),
    (["train", "--device", "cpu"], "error: the following arguments are required: --out"),
])
def test_bad_counts_in_other_commands(tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert error_line(capsys, argv).startswith(message)


def test_device_that_is_not_there(tmp_path, capsys):
    for command in (train(tmp_path / "run"), ["demo", "--out", str(tmp_path / "d")],
                    ["detect", "--weights", "m", "a.png"], ["evaluate", "--weights", "m"]):
        if torch.cuda.is_available():
            wanted, why = "cuda:99", "error: --device cuda:99: this machine has"
        else:
            wanted, why = "cuda", "error: --device cuda: CUDA is not available on this machine"
        assert error_line(capsys, command + ["--device", wanted]).startswith(why)
        assert error_line(capsys, command + ["--device", "gpu"]) == \
            "error: --device gpu: not a device (cpu, cuda or cuda:N)"
    assert not (tmp_path / "run").exists() and not (tmp_path / "d").exists()


def test_out_that_is_a_file(tmp_path, capsys, a_file):
    for argv in (train(a_file), ["demo", "--out", str(a_file)], ["detect", "--weights", "m", "--out", str(a_file), "x.png"]):
        assert error_line(capsys, argv) == f"error: --out {a_file}: is a file, not a folder"
    assert error_line(capsys, train(a_file / "run")) == f"error: --out {a_file / 'run'}: {a_file} is a file, not a folder"
    assert error_line(capsys, ["convert", "--from", "matterport", "w.h5", str(a_file)]) == \
        f"error: DST {a_file}: is a file, not a folder"
    assert error_line(capsys, ["evaluate", "--weights", "m", "--out", str(tmp_path)]) == \
        f"error: --out {tmp_path}: is a folder; give a file name"
    assert a_file.read_text() == "not a folder\n"


def test_convert_checks_set_before_reading_weights(tmp_path, capsys):
    err = error_line(capsys, ["convert", "--from", "torchvision", "coco", str(tmp_path / "o"), "--set", "train_bn=maybe"])
    assert err == "error: train_bn='maybe' must be true or false"

