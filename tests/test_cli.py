"""The ``dlvm`` command, run in-process through ``cli.main(argv)`` on small data in temporary directories.

Acceptance: training the MLP VAE on digits for 2 minutes or less improves the test ELBO by at least 20 nats from
initialisation, under the CLI, in a temporary directory, and the run directory holds metrics, params and figures.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dlvm_jax import cli, train

EPOCHS = 10  # a few seconds on 2 CPU cores; the continuous-Bernoulli ELBO gains > 100 nats by then


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    code = cli.main(["train", "vae", "--epochs", str(EPOCHS), "--eval-every", "5", "--run-dir", str(run_dir),
                     "--no-progress"])
    assert code == 0
    return run_dir


def test_train_digits_improves_elbo_and_writes_run_dir(digits_run: Path) -> None:
    for name in ("config.json", "metrics.jsonl", "params.msgpack", "summary.json", "reconstructions.png",
                 "samples.png", "training_curves.png"):
        assert (digits_run / name).is_file(), name
        assert (digits_run / name).stat().st_size > 0, name
    summary = json.loads((digits_run / "summary.json").read_text())
    history = train.read_jsonl(digits_run / "metrics.jsonl")
    # metrics.jsonl: initial evaluation (epoch 0), every 5 epochs, and the end
    assert [h["epoch"] for h in history] == [0, 5, 10]
    assert summary["initial_test_elbo"] == pytest.approx(history[0]["test_elbo"])
    assert summary["final_test_elbo"] == pytest.approx(history[-1]["test_elbo"])
    assert summary["improvement"] >= 20.0
    assert summary["seconds"] <= 120.0
    assert summary["epochs"] == EPOCHS and not summary["stopped_by_time_limit"]
    config = json.loads((digits_run / "config.json").read_text())
    assert config["model"] == "vae"
    assert config["model_config"]["likelihood"] == "continuous_bernoulli"
    assert config["data"]["source"] == "digits"


def test_figures_are_png(digits_run: Path) -> None:
    for name in ("reconstructions.png", "samples.png", "training_curves.png"):
        assert (digits_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_rebuilds_model_and_writes_json(digits_run: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["evaluate", str(digits_run), "--num-samples", "100", "--chunk-size", "50", "--batch-size", "10",
                     "--max-examples", "20", "--no-progress"])
    assert code == 0
    result = json.loads((digits_run / "evaluation.json").read_text())
    assert result["num_examples"] == 20 and result["num_samples"] == 100
    assert np.isfinite(result["log_px"]) and result["log_px_mc_se"] >= 0
    # log p(x) >= ELBO on average (Jensen), up to Monte-Carlo noise: it is the K=100 IWAE bound on the same samples
    assert result["log_px"] >= result["elbo"] - 1e-3
    assert 1.0 <= result["ess_mean"] <= 100.0
    # the evaluation ELBO is on the same scale as the training summary's final test ELBO
    summary = json.loads((digits_run / "summary.json").read_text())
    assert abs(result["elbo"] - summary["final_test_elbo"]) < 30.0
    assert "log p(x)" in capsys.readouterr().out


def test_sample_writes_png_and_npy(digits_run: Path, tmp_path: Path) -> None:
    out, npy = tmp_path / "s.png", tmp_path / "s.npy"
    assert cli.main(["sample", str(digits_run), "--num", "9", "--out", str(out), "--npy", str(npy)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    samples = np.load(npy)
    assert samples.shape == (9, 64)
    assert np.all((samples >= 0) & (samples <= 1))  # continuous-Bernoulli means lie in [0, 1]


def test_predict_refuses_a_vae(digits_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    np.save(tmp_path / "x.npy", np.zeros((3, 64), np.float32))
    code = cli.main(["predict", str(digits_run), "--data", str(tmp_path / "x.npy"), "--out", str(tmp_path / "y.npy")])
    _assert_one_line_error(code, capsys, "predict")


# ------------------------------------------------------------------------------------------------------------
# User mistakes: ONE line on stderr, exit status 2, nothing written
# ------------------------------------------------------------------------------------------------------------


def _assert_one_line_error(code: int, capsys: pytest.CaptureFixture, *needles: str) -> None:
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("dlvm: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unknown_option_exits_2(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "vae", "--no-such-option"])
    _assert_one_line_error(info.value.code, capsys, "--no-such-option")


def test_nan_data_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    x = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    x[7, 1] = np.nan
    np.save(tmp_path / "nan.npy", x)
    code = cli.main(["train", "vae", "--data", str(tmp_path / "nan.npy"), "--run-dir", str(tmp_path / "run")])
    _assert_one_line_error(code, capsys, "NaN")
    assert not (tmp_path / "run").exists()


def test_bernoulli_needs_unit_interval(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    np.save(tmp_path / "wide.npy", np.linspace(-3, 3, 100, dtype=np.float32).reshape(50, 2))
    code = cli.main(["train", "vae", "--data", str(tmp_path / "wide.npy"), "--likelihood", "bernoulli",
                     "--run-dir", str(tmp_path / "run")])
    _assert_one_line_error(code, capsys, "[0, 1]", "--likelihood gaussian")
    assert not (tmp_path / "run").exists()


def test_batch_size_larger_than_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["train", "vae", "--batch-size", "100000", "--run-dir", str(tmp_path / "run")])
    _assert_one_line_error(code, capsys, "batch size")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [["train", "vae", "--num-samples", "0"], ["train", "vae", "-K", "-3"]])
def test_num_samples_below_one(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(argv + ["--run-dir", str(tmp_path / "run")])
    _assert_one_line_error(code, capsys, ">= 1")
    assert not (tmp_path / "run").exists()


def test_evaluate_k_below_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _assert_one_line_error(cli.main(["evaluate", str(tmp_path), "-K", "0"]), capsys, ">= 1")


def test_missing_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _assert_one_line_error(cli.main(["evaluate", str(tmp_path / "nope")]), capsys, "no run directory")
    _assert_one_line_error(cli.main(["sample", str(tmp_path)]), capsys, "config.json")


def test_missing_data_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["train", "vae", "--data", str(tmp_path / "missing.npy")])
    _assert_one_line_error(code, capsys, "missing.npy")


def test_existing_run_dir_is_not_overwritten(digits_run: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["train", "vae", "--run-dir", str(digits_run)])
    _assert_one_line_error(code, capsys, "already exists")


def test_parse_int_list() -> None:
    assert cli.parse_int_list("128,128") == (128, 128)
    assert cli.parse_int_list("none") == ()
    with pytest.raises(Exception):
        cli.parse_int_list("12,x")


def test_every_model_kind_has_a_train_subcommand() -> None:
    parser = cli.build_parser()
    for name in cli.MODEL_KINDS:
        args = parser.parse_args(["train", name])
        assert args.model == name and args.func is cli.cmd_train


def test_console_script_help() -> None:
    exe = Path(sys.executable).parent / "dlvm"
    script = str(exe) if exe.exists() else shutil.which("dlvm")
    assert script, "the dlvm console script is not installed (pip install -e .)"
    out = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "train" in out.stdout and "evaluate" in out.stdout and "sample" in out.stdout


def test_gmvae_train_and_predict_on_npy(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The stable interface: ``dlvm train gmvae --data PATH.npy --clusters K --run-dir DIR`` and
    ``dlvm predict DIR --data PATH.npy --out OUT.npy`` (int array (N,) of the most probable clusters)."""
    from dlvm_jax import data

    x, _ = data.make_spiral(400, seed=1)
    np.save(tmp_path / "points.npy", x)
    run_dir = tmp_path / "gm"
    code = cli.main(["train", "gmvae", "--data", str(tmp_path / "points.npy"), "--clusters", "3", "--epochs", "4",
                     "--restarts", "2", "--batch-size", "50", "--run-dir", str(run_dir), "--no-progress"])
    assert code == 0
    for name in ("config.json", "metrics.jsonl", "params.msgpack", "summary.json", "clusters.png", "samples.png"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts"]["restarts"] == 2 and summary["restarts"]["chosen"] in (0, 1)
    assert len(summary["restarts"]["train_log_px"]) == 2
    code = cli.main(["predict", str(run_dir), "--data", str(tmp_path / "points.npy"), "--out", str(tmp_path / "y.npy")])
    assert code == 0
    pred = np.load(tmp_path / "y.npy")
    assert pred.shape == (400,) and np.issubdtype(pred.dtype, np.integer)
    assert pred.min() >= 0 and pred.max() < 3
    # Data of another width than the model's: one clear line, exit 2.
    np.save(tmp_path / "wide.npy", np.zeros((5, 3), np.float32))
    capsys.readouterr()
    code = cli.main(["predict", str(run_dir), "--data", str(tmp_path / "wide.npy"), "--out", str(tmp_path / "z.npy")])
    err = capsys.readouterr().err
    assert code == 2 and "shape" in err and len(err.strip().splitlines()) == 1


def test_gmvae_on_labelled_spiral_prints_accuracy(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["train", "gmvae", "--epochs", "2", "--restarts", "1", "--run-dir", str(tmp_path / "s"),
                     "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "NMI" in out
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert 0.0 <= summary["test_clustering"]["accuracy"] <= 1.0
