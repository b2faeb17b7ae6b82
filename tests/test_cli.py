"""The ``dlvm`` command, run in-process through ``cli.main(argv)`` on small data in temporary directories.

Acceptance: training the MLP VAE on digits for 2 minutes or less improves the test ELBO by at least 20 nats from
initialisation, under the CLI, in a temporary directory, and the run directory holds metrics, params and figures.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import flax.serialization
import jax
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


@pytest.mark.parametrize("estimator", ["stl", "score"])
def test_gradient_estimator_option_trains_and_is_recorded(estimator: str, tmp_path: Path) -> None:
    run_dir = tmp_path / estimator
    code = cli.main(["train", "vae", "--data", "spiral", "--epochs", "4", "--eval-every", "4", "-K", "4",
                     "--estimator", estimator, "--run-dir", str(run_dir), "--no-progress"])
    assert code == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["objective"]["estimator"] == estimator
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_test_elbo"] > summary["initial_test_elbo"]  # both estimators climb the ELBO


def test_microbatch_option_trains_and_is_recorded(tmp_path: Path) -> None:
    run_dir = tmp_path / "mb"
    code = cli.main(["train", "vae", "--data", "spiral", "--epochs", "4", "--eval-every", "4", "--batch-size", "50",
                     "--microbatch", "10", "--run-dir", str(run_dir), "--no-progress"])
    assert code == 0
    assert json.loads((run_dir / "config.json").read_text())["train"]["microbatch"] == 10
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_test_elbo"] > summary["initial_test_elbo"]


@pytest.mark.parametrize("argv, needle", [
    (["vae", "--estimator", "score", "-K", "1"], "-K 2 or more"),
    (["vae", "--estimator", "score", "--objective", "iwae", "-K", "5"], "--objective elbo"),
    (["vae", "--microbatch", "7"], "must divide the batch size 100"),
    (["vae", "--microbatch", "0"], "must divide the batch size 100"),
    (["gmvae", "--microbatch", "10"], "the gmvae's is not"),
])
def test_refused_training_options(argv: list[str], needle: str, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    """The score estimator needs the ELBO and two samples; a microbatch must divide the batch, and only the VAE's
    loss (a mean over examples) takes one."""
    code = cli.main(["train", *argv, "--data", "spiral", "--run-dir", str(tmp_path / "r")])
    _assert_one_line_error(code, capsys, needle)
    assert not (tmp_path / "r").exists()


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


# ------------------------------------------------------------------------------------------------------------
# Checkpoints, resume after SIGKILL, reproducibility, option files, and the bad input of issue 7
# ------------------------------------------------------------------------------------------------------------

# A spiral VAE (4000 training points, 40 steps per epoch), evaluated every 2 epochs, checkpointed every 200
# steps (5 epochs): evaluations fall between checkpoints, so a killed run leaves records that its resumed run must
# not repeat. The reference run reads these options from a JSON option file, the killed run from the command line.
SPIRAL_OPTIONS = {"data": "spiral", "epochs": 40, "eval_every": 2, "checkpoint-every": 200, "no_progress": True}
SPIRAL_ARGS = ["--data", "spiral", "--epochs", "40", "--eval-every", "2", "--checkpoint-every", "200",
               "--no-progress"]


def _without_seconds(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in train.read_jsonl(run_dir / "metrics.jsonl")]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def spiral_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted reference run, its options from a JSON option file."""
    folder = tmp_path_factory.mktemp("spiral")
    (folder / "options.json").write_text(json.dumps(SPIRAL_OPTIONS))
    run_dir = folder / "run"
    assert cli.main(["train", "vae", "--config", str(folder / "options.json"), "--run-dir", str(run_dir)]) == 0
    return run_dir


def _dlvm_subprocess(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    # tensorflow, if installed, is imported by distrax and only costs start-up time here: keep it out.
    code = "import sys; sys.modules['tensorflow'] = None; from dlvm_jax.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def test_sigkill_then_resume_gives_the_uninterrupted_run(spiral_run: Path, tmp_path: Path) -> None:
    """Kill a training process with SIGKILL once it has written its second checkpoint (step 400), resume it:
    the final parameters equal the uninterrupted run's (bitwise, so within 1e-6), and metrics.jsonl holds every
    evaluation once, with the same numbers."""
    run_dir = tmp_path / "killed"
    proc = _dlvm_subprocess(["train", "vae", *SPIRAL_ARGS, "--run-dir", str(run_dir)])
    ckpt = run_dir / cli.CHECKPOINT_DIR
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            done = [int(p.name) for p in ckpt.glob("*") if p.name.isdigit() and (p / "dlvm_files.json").is_file()]
            if done and max(done) >= 400:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    last = max(int(p.name) for p in ckpt.glob("*") if p.name.isdigit())
    assert 400 <= last < 40 * 40  # killed mid-run (40 epochs of 40 steps)
    assert cli.main(["train", "--resume", str(run_dir), "--no-progress"]) == 0

    a = flax.serialization.msgpack_restore((spiral_run / "params.msgpack").read_bytes())
    b = flax.serialization.msgpack_restore((run_dir / "params.msgpack").read_bytes())
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=1e-6)
        assert np.array_equal(x, y)  # in fact bitwise equal
    records = _without_seconds(run_dir)
    assert [r["epoch"] for r in records] == list(range(0, 41, 2))  # each evaluation once, none missing
    assert records == _without_seconds(spiral_run)
    assert len([p for p in ckpt.glob("*") if p.name.isdigit()]) <= 3  # the last 3 kept


def test_same_config_and_seed_give_bitwise_identical_metrics(spiral_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "again"
    assert cli.main(["train", "vae", *SPIRAL_ARGS, "--run-dir", str(run_dir)]) == 0
    assert _without_seconds(run_dir) == _without_seconds(spiral_run)  # every float, bit for bit
    assert (run_dir / "params.msgpack").read_bytes() == (spiral_run / "params.msgpack").read_bytes()


def _copy_run(spiral_run: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "copy"
    shutil.copytree(spiral_run, run_dir)
    return run_dir


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_resume_refuses_a_damaged_checkpoint(spiral_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                             damage: str) -> None:
    run_dir = _copy_run(spiral_run, tmp_path)
    latest = max(int(p.name) for p in (run_dir / "checkpoints").glob("*") if p.name.isdigit())
    files = [p for p in (run_dir / "checkpoints" / str(latest) / "state").rglob("*") if p.parent.name == "d"]
    target = max(files, key=lambda p: p.stat().st_size)
    raw = bytearray(target.read_bytes())
    if damage == "truncated":
        del raw[len(raw) // 2:]
    else:
        raw[len(raw) // 3] ^= 0x01
    target.write_bytes(bytes(raw))
    before = _snapshot(run_dir)
    capsys.readouterr()
    code = cli.main(["train", "--resume", str(run_dir), "--epochs", "50", "--no-progress"])
    _assert_one_line_error(code, capsys, f"checkpoints/{latest} is truncated or corrupted", "delete that folder")
    assert _snapshot(run_dir) == before  # config.json (epochs), metrics, checkpoints: all as they were


def test_resume_refuses_a_checkpoint_of_another_config(spiral_run: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """The run's config now says latent_dim 3: the checkpoints (written for latent_dim 2) are refused."""
    run_dir = _copy_run(spiral_run, tmp_path)
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["model_config"]["latent_dim"] = 3
    (run_dir / "config.json").write_text(json.dumps(cfg))
    before = _snapshot(run_dir)
    capsys.readouterr()
    code = cli.main(["train", "--resume", str(run_dir), "--no-progress"])
    _assert_one_line_error(code, capsys, "another model or configuration", "model_config.latent_dim is 2 there and 3 here")
    assert _snapshot(run_dir) == before


def test_resume_and_evaluate_refuse_data_of_another_shape(spiral_run: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    run_dir = _copy_run(spiral_run, tmp_path)
    np.save(tmp_path / "wide.npy", np.random.default_rng(0).normal(size=(5000, 3)).astype(np.float32))
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["data"]["source"] = str(tmp_path / "wide.npy")  # as if the run's data file had been replaced
    (run_dir / "config.json").write_text(json.dumps(cfg))
    before = _snapshot(run_dir)
    capsys.readouterr()
    code = cli.main(["train", "--resume", str(run_dir), "--no-progress"])
    _assert_one_line_error(code, capsys, "now has examples of shape (3,), but the run was trained on shape (2,)")
    code = cli.main(["evaluate", str(run_dir), "-K", "10", "--no-progress"])
    _assert_one_line_error(code, capsys, "now has examples of shape (3,), but the run was trained on shape (2,)")
    assert _snapshot(run_dir) == before


def test_resume_refuses_changed_options_and_missing_checkpoints(spiral_run: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    run_dir = _copy_run(spiral_run, tmp_path)
    before = _snapshot(run_dir)
    capsys.readouterr()
    _assert_one_line_error(cli.main(["train", "vae", "--resume", str(run_dir), "--lr", "0.1"]), capsys,
                           "--lr cannot be changed when resuming")
    _assert_one_line_error(cli.main(["train", "gmvae", "--resume", str(run_dir)]), capsys,
                           "holds a vae run, not a gmvae one")
    (tmp_path / "options.json").write_text(json.dumps({"epochs": 3}))
    _assert_one_line_error(cli.main(["train", "vae", "--resume", str(run_dir), "--config",
                                     str(tmp_path / "options.json")]), capsys, "--config cannot be used with --resume")
    assert _snapshot(run_dir) == before
    shutil.rmtree(run_dir / "checkpoints")
    _assert_one_line_error(cli.main(["train", "--resume", str(run_dir)]), capsys, "no checkpoint to resume from")
    _assert_one_line_error(cli.main(["train"]), capsys, "choose a model to train")


def test_option_file_values_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    parser = cli.build_parser()
    vae = parser.parse_args(["train", "vae"]).train_parser
    path = tmp_path / "options.json"
    path.write_text(json.dumps({"model": "vae", "batch-size": 50, "hidden": [32, 16], "lr": 1, "mc_kl": True,
                                "time_limit": None, "objective": "iwae"}))
    values = cli.read_option_file(path, vae, model="vae")
    assert values == {"batch_size": 50, "hidden": (32, 16), "lr": 1.0, "analytic_kl": False, "time_limit": None,
                      "objective": "iwae"}
    # Through the command: the file's values become the defaults, options on the command line win.
    vae.set_defaults(**values)
    args = parser.parse_args(["train", "vae", "--lr", "0.5"])
    assert (args.batch_size, args.hidden, args.lr, args.analytic_kl) == (50, (32, 16), 0.5, False)

    for content, needles in [
        ({"epoch": 3}, ["unknown key 'epoch'", "(did you mean 'epochs'?)"]),
        ({"batchsize": 3}, ["unknown key 'batchsize'", "did you mean 'batch_size'?"]),
        ({"epochs": "3"}, ["key 'epochs'", "must be an integer, got \"3\""]),
        ({"lr": True}, ["key 'lr'", "must be a number"]),
        ({"objective": "iwea"}, ["key 'objective'", "must be one of", "did you mean 'iwae'?"]),
        ({"hidden": [32, "x"]}, ["key 'hidden'", "list of integers"]),
        ({"skip_nonfinite": "yes"}, ["key 'skip_nonfinite'", "true or false"]),
        ({"model": "gmvae"}, ["is for model 'gmvae', not 'vae'"]),
        ([1, 2], ["must hold a JSON object"]),
    ]:
        path.write_text(json.dumps(content))
        capsys.readouterr()
        code = cli.main(["train", "vae", "--config", str(path), "--run-dir", str(tmp_path / "run")])
        _assert_one_line_error(code, capsys, *needles)
    path.write_text('{"epochs": 3,')
    _assert_one_line_error(cli.main(["train", "vae", "--config", str(path)]), capsys, "cannot read config file")
    assert not (tmp_path / "run").exists()


def test_unwritable_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    code = cli.main(["train", "vae", "--data", "spiral", "--run-dir", str(tmp_path / "a_file" / "run")])
    _assert_one_line_error(code, capsys, "cannot write to the run directory", "choose another --run-dir")
    assert (tmp_path / "a_file").read_text() == "not a folder"
    if os.geteuid() != 0:  # root writes anywhere: the permission case needs an ordinary user
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            code = cli.main(["train", "vae", "--data", "spiral", "--run-dir", str(locked / "run")])
            _assert_one_line_error(code, capsys, "cannot write to the run directory")
        finally:
            locked.chmod(0o700)


def test_non_finite_training_stops_with_step_and_term(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Values of 1e20 make the Gaussian log-likelihood overflow at the first step: one line names the step and
    the terms, the step-0 checkpoint stays, and the message says how to go on skipping such updates."""
    np.save(tmp_path / "huge.npy", np.full((200, 2), 1e20, np.float32))
    run_dir = tmp_path / "run"
    code = cli.main(["train", "vae", "--data", str(tmp_path / "huge.npy"), "--epochs", "3", "--batch-size", "40",
                     "--run-dir", str(run_dir), "--no-progress"])
    _assert_one_line_error(code, capsys, "training went non-finite in epoch 1 at step 1 (batch 1 of 4)", "'loss'",
                           "the last good checkpoint (step 0) is kept",
                           f"dlvm train --resume {run_dir} --skip-nonfinite")
    assert [r["epoch"] for r in train.read_jsonl(run_dir / "metrics.jsonl")] == [0]
    assert [p.name for p in (run_dir / "checkpoints").glob("*") if p.name.isdigit()] == ["0"]
