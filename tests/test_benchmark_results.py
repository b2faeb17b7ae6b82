"""How ``python -m benchmarks`` turns its workers' measurements into results (no workers run here): the
``--microbatch`` sizes, each framework's fastest microbatch size, and the MLP IS target against the matmul peak
sampled alongside the IS batches."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from benchmarks import __main__ as bench
from benchmarks import report


def test_microbatch_sizes_are_parsed_and_checked(capsys):
    assert bench.parse_args([]).microbatch == bench.MICROBATCH_SIZES == (0, 5, 10)
    assert bench.parse_args(["--microbatch", "10"]).microbatch == (10,)
    assert bench.parse_args(["--microbatch", "0, 20,0,5"]).microbatch == (0, 20, 5)
    for bad, says in [("7", "divide the batch size 100"), ("100", "divide the batch size 100"),
                      ("-5", "divide the batch size 100"), ("ten", "comma-separated integers"),
                      (",", "divide the batch size 100")]:
        with pytest.raises(SystemExit):
            bench.parse_args(["--microbatch", bad])
        assert says in capsys.readouterr().err


def test_microbatch_description():
    assert bench.microbatch_description((0,)) == "none"
    assert "over microbatches of 10 examples in every framework" in bench.microbatch_description((10,))
    assert ("with the whole batch, microbatches of 5 and microbatches of 10 in every framework alike"
            in bench.microbatch_description((0, 5, 10)))


def _by_size() -> dict[int, dict[str, dict]]:
    return {
        0: {"jax": {"steps_per_s": 10.0}, "torch_eager": {"steps_per_s": 7.0},
            "torch_compile": {"error": "no compiler"}},
        5: {"jax": {"steps_per_s": 12.0}, "torch_eager": {"error": "crashed"},
            "torch_compile": {"steps_per_s": 9.0}},
        10: {"jax": {"steps_per_s": 15.0}, "torch_eager": {"steps_per_s": 6.0},
             "torch_compile": {"steps_per_s": 8.0}},
    }


def test_each_framework_is_taken_at_its_fastest_microbatch_size():
    outs, sizes = bench.fastest(_by_size())
    assert sizes == {"jax": 10, "torch_eager": 0, "torch_compile": 5}
    assert [outs[f]["steps_per_s"] for f in bench.TRAIN_FRAMEWORKS] == [15.0, 7.0, 9.0]
    # A framework that failed at every size keeps an error (the first size's) and no size.
    failed = {0: {"jax": {"steps_per_s": 1.0}, "torch_eager": {"error": "a"}, "torch_compile": {"error": "b"}},
              5: {"jax": {"steps_per_s": 2.0}, "torch_eager": {"error": "c"}, "torch_compile": {"error": "d"}}}
    outs, sizes = bench.fastest(failed)
    assert sizes == {"jax": 5, "torch_eager": None, "torch_compile": None}
    assert outs["torch_eager"] == {"error": "a"}


def test_train_entry_reports_the_fastest_and_every_size():
    entry = bench.train_entry("conv_vae", 1, _by_size(), peak=100e9)
    assert entry["jax_steps_per_s"] == 15.0 and entry["torch_eager_steps_per_s"] == 7.0
    assert entry["torch_compile_steps_per_s"] == 9.0
    assert entry["ratio_vs_eager"] == pytest.approx(15 / 7, abs=0.005)  # 3 significant digits
    assert entry["ratio_vs_eager_whole_batch"] == pytest.approx(10 / 7, abs=0.005)
    assert entry["microbatch"] == {"jax": 10, "torch_eager": 0, "torch_compile": 5}
    assert entry["steps_per_s_by_microbatch"]["5"] == {"jax": 12.0, "torch_eager": None, "torch_compile": 9.0}
    assert set(entry["raw"]) == {"0", "5", "10"}
    assert "torch_compile_error" not in entry and "errors" not in entry
    # One size: the entry as before, the workers' outputs as raw.
    single = bench.train_entry("mlp_vae", 1, {0: _by_size()[0]}, peak=100e9)
    assert "steps_per_s_by_microbatch" not in single and single["raw"]["jax"] == {"steps_per_s": 10.0}
    assert single["torch_compile_error"] == "no compiler"



def test_scanned_epoch_is_reported_beside_the_step_and_not_as_a_target():
    by_size = {0: {"jax": {"steps_per_s": 300.0, "epoch_steps_per_s": 330.0, "epoch_batches": 10},
                   "torch_eager": {"steps_per_s": 200.0}, "torch_compile": {"steps_per_s": 250.0}}}
    entry = bench.train_entry("mlp_vae", 1, by_size, peak=100e9)
    assert entry["jax_steps_per_s"] == 300.0 and entry["jax_epoch_steps_per_s"] == 330.0
    assert entry["ratio_vs_eager"] == 1.5 and entry["epoch_ratio_vs_eager"] == 1.65
    targets = bench.check_targets({"mlp_vae": {"train_M1": entry}})
    assert [t["value"] for t in targets] == [1.5]  # the step's ratio, not the epoch's
    # Workers that did not time an epoch (the conv VAE) leave the fields out.
    assert "jax_epoch_steps_per_s" not in bench.train_entry("conv_vae", 1, _by_size(), peak=100e9)
    assert bench.SCANNED == ("mlp_vae", "gmvae")
    results = {
        "command": "python -m benchmarks", "quick": False, "data": {"images": "random", "spiral": "spiral"},
        "machine": {"cpu": "CPU", "cores": 2, "device": "cpu", "jax": "0", "flax": "0", "torch": "0", "date": "d",
                    "load_average_start": [0, 0, 0], "load_average_end": [0, 0, 0], "microbatch": "none"},
        "matmul_peak": {"n": 2048, "jax_gflops": 400.0, "torch_gflops": 200.0, "peak_gflops": 400.0},
        "models": {"mlp_vae": {"train_M1": entry}},
    }
    results["targets"] = targets
    assert "| MLP VAE | 1 | 300 | 330 | 200 | 1.65 |" in report.markdown(results)

def _is_entry(adjacent: float | None) -> dict:
    jax_out = {"logw_per_s": 400_000.0, "compile_s": 1.0, "log_px_mean": -90.0, "peak_rss_mb": 500.0}
    if adjacent is not None:
        jax_out["adjacent_peak_gflops"] = adjacent
    outs = {"jax": jax_out, "torch": {"logw_per_s": 100_000.0, "log_px_mean": -90.0, "peak_rss_mb": 400.0}}
    return bench.is_entry("mlp_vae", 5000, 1000, outs, peak=400e9, chunk=100, batch=100)


def test_mlp_is_target_uses_the_peak_sampled_alongside():
    from benchmarks import flops

    per_logw = flops.log_weight_flops("mlp_vae", 5000)
    entry = _is_entry(adjacent=300.0)
    assert entry["fraction_of_matmul_peak"] == pytest.approx(400_000 * per_logw / 400e9, rel=1e-3)
    assert entry["fraction_of_adjacent_matmul_peak"] == pytest.approx(400_000 * per_logw / 300e9, rel=1e-3)
    target = [t for t in bench.check_targets({"mlp_vae": {"is_K5000": entry}}) if "peak" in t["what"]]
    assert len(target) == 1 and "sampled between its batches" in target[0]["what"]
    assert target[0]["value"] == entry["fraction_of_adjacent_matmul_peak"]
    assert target[0]["met"] == (entry["fraction_of_adjacent_matmul_peak"] >= 0.4)
    # Without samples (an older worker, or a failed probe): the run's peak.
    plain = _is_entry(adjacent=None)
    assert plain["fraction_of_adjacent_matmul_peak"] is None
    target = [t for t in bench.check_targets({"mlp_vae": {"is_K5000": plain}}) if "peak" in t["what"]]
    assert target[0]["value"] == plain["fraction_of_matmul_peak"] and "sampled" not in target[0]["what"]


def test_report_shows_sizes_and_the_peak_sampled_alongside():
    results = {
        "command": "python -m benchmarks", "quick": False, "data": {"images": "random", "spiral": "spiral"},
        "machine": {"cpu": "CPU", "cores": 2, "device": "cpu", "jax": "0", "flax": "0", "torch": "0", "date": "d",
                    "load_average_start": [0, 0, 0], "load_average_end": [0, 0, 0],
                    "microbatch": bench.microbatch_description((0, 5, 10))},
        "matmul_peak": {"n": 2048, "jax_gflops": 400.0, "torch_gflops": 200.0, "peak_gflops": 400.0},
        "models": {"conv_vae": {"train_M1": bench.train_entry("conv_vae", 1, _by_size(), peak=400e9)},
                   "mlp_vae": {"is_K5000": _is_entry(adjacent=300.0)}},
    }
    results["targets"] = bench.check_targets(results["models"])
    text = report.markdown(results)
    assert "| conv VAE | 1 | 15 (mb 10) | 7 | 9 (mb 5) | 2.14 |" in text
    assert "| conv VAE | 1 | 0 | 10 | 7 | - | 1.43 |" in text
    assert "| conv VAE | 1 | 5 | 12 | - | 9 | - |" in text
    shares = [f"{100 * results['models']['mlp_vae']['is_K5000'][k]:.1f}%"
              for k in ("fraction_of_matmul_peak", "fraction_of_adjacent_matmul_peak")]
    assert f"| {shares[0]} | {shares[1]} |" in text


def test_compare_takes_the_fastest_and_the_median_over_runs():
    from benchmarks import compare

    def run(jax: float, eager: float | None) -> dict:
        return {"command": "python -m benchmarks", "machine": {"date": "d"},
                "models": {"conv_vae": {"train_M1": {"jax_steps_per_s": jax, "torch_eager_steps_per_s": eager,
                                                     "torch_compile_steps_per_s": None}}}}

    runs = [("a", run(15.0, 9.0)), ("b", run(10.0, 10.5)), ("c", run(16.0, None)), ("d", run(14.0, 9.5))]
    row = compare.compare(runs)["rows"][0]
    assert (row["jax"], row["jax_run"], row["torch_eager"], row["torch_eager_run"]) == (16.0, "c", 10.5, "b")
    assert row["ratio_vs_torch_eager"] == pytest.approx(16 / 10.5, abs=1e-3)
    assert (row["jax_median"], row["jax_runs"]) == (14.5, 4)
    assert (row["torch_eager_median"], row["torch_eager_runs"]) == (9.5, 3)  # c did not measure it
    assert row["ratio_vs_torch_eager_median"] == pytest.approx(14.5 / 9.5, abs=1e-3)
    assert row["torch_compile_median"] is None and row["ratio_vs_torch_compile_median"] is None
    text = compare.markdown(compare.compare(runs))
    assert "| conv VAE | train_M1 | 14.5 (4) | 9.5 (3) | - | 1.53 | - |" in text


_FAKE_WORKER = r"""
import json, sys, time
task = json.loads(sys.argv[1])
log = open(task["log"], "a")
if task.get("fail"):
    print("RESULT " + json.dumps({"error": "no compiler"}), flush=True)
    sys.exit(0)
for i in range(task["repeats"]):
    print("WAITING", flush=True)
    sys.stdin.readline()
    log.write(f"{task['framework']} {i}\n")
    log.flush()
    print("TIMED", flush=True)
print("RESULT " + json.dumps({"steps_per_s": 1.0, "interleaved": task["interleaved"]}), flush=True)
"""


def test_interleaved_workers_take_turns(tmp_path, monkeypatch):
    """run_interleaved starts the workers one by one, then alternates their repeats, the first worker rotating;
    a worker that ends before its repeats (an error) is left out and keeps its result."""
    script = tmp_path / "fake_worker.py"
    script.write_text(_FAKE_WORKER)
    log = tmp_path / "turns.log"
    monkeypatch.setattr(bench, "_worker_command",
                        lambda task, args: ([sys.executable, str(script), json.dumps(task)], None))
    args = bench.parse_args(["--repeats", "3"])
    tasks = {fw: {"framework": fw, "repeats": 3, "log": str(log)} for fw in ("jax", "torch_eager")}
    tasks["torch_compile"] = {"framework": "torch_compile", "repeats": 3, "log": str(log), "fail": True}
    outs = bench.run_interleaved(tasks, args)
    assert outs["torch_compile"]["error"] == "no compiler"
    assert outs["jax"]["steps_per_s"] == 1.0 and outs["jax"]["interleaved"] is True
    assert "wall_s" in outs["torch_eager"]
    assert log.read_text().split("\n")[:-1] == ["jax 0", "torch_eager 0", "torch_eager 1", "jax 1", "jax 2",
                                                "torch_eager 2"]


def test_ab_commits_checks_its_arguments_and_where_the_library_came_from(tmp_path, capsys, monkeypatch):
    """``benchmarks.ab_commits`` needs a commit that exists, and its child refuses a library imported from
    anywhere but the tree it was given (an editable install shadowing the baseline would make the A/B a lie)."""
    from benchmarks import ab_commits

    monkeypatch.setattr(sys, "path", list(sys.path))  # the child puts the trees first; undone after the test
    for argv, says in [([], "--baseline REV is required"), (["--baseline", "no-such-revision-xyz"], "no commit"),
                       (["--baseline", "HEAD", "--rounds", "0"], "at least 1")]:
        with pytest.raises(SystemExit):
            ab_commits.main(argv)
        assert says in capsys.readouterr().err
    (tmp_path / "dlvm_jax").mkdir()  # an empty folder: dlvm_jax is already imported from this checkout
    with pytest.raises(RuntimeError, match="not from"):
        ab_commits.child(str(tmp_path), {})


def test_noise_profile_merges_windows_and_estimates_the_ratio_of_medians():
    from benchmarks.profile_noise import merged_rates, ratio_of_medians, spread

    # two windows of equal step counts at 100 and 300 steps/s: the steps over the summed time, 150 (not 200)
    np.testing.assert_allclose(merged_rates([100.0, 300.0, 200.0], 2), [150.0])
    np.testing.assert_allclose(merged_rates([100.0, 300.0, 200.0], 1), [100.0, 300.0, 200.0])
    s = spread(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert (s["median"], s["min"], s["max"], s["windows"]) == (3.0, 1.0, 5.0, 5)
    # constant rates: every draw gives the exact ratio; a ratio under the target is counted as such
    r = ratio_of_medians(np.full(10, 300.0), np.full(10, 200.0), draws=50)
    assert r["p5"] == r["p50"] == r["p95"] == 1.5 and r["fraction_below_1.5"] == 0.0
    r = ratio_of_medians(np.full(10, 280.0), np.full(10, 200.0), draws=50)
    assert r["p50"] == 1.4 and r["fraction_below_1.5"] == 1.0
    assert ratio_of_medians(np.ones(4), np.ones(10)) is None  # fewer windows than repeats


def test_pairs_alternates_the_frameworks_and_reports_round_ratios(tmp_path, capsys, monkeypatch):
    """``benchmarks.pairs`` runs JAX and PyTorch in ABBA order, one ratio per round, and the ratio of the medians;
    it refuses a microbatch size that does not divide the batch and stops on a worker's error."""
    from benchmarks import pairs

    order, speeds = [], {"jax": iter([450.0, 440.0, 470.0]), "torch_eager": iter([300.0, 200.0, 310.0])}

    def fake_worker(task, args):
        order.append(task["framework"])
        assert task["kind"] == "train" and task["model"] == "mlp_vae" and task["batch_size"] == 100
        return {"steps_per_s": next(speeds[task["framework"]]), "repeat_steps_per_s": [1.0], "wall_s": 1.0}

    monkeypatch.setattr(pairs, "run_worker", fake_worker)
    out = tmp_path / "pairs.json"
    assert pairs.main(["--model", "mlp_vae", "--rounds", "3", "--out", str(out)]) == 0
    assert order == ["jax", "torch_eager", "torch_eager", "jax", "jax", "torch_eager"]
    result = json.loads(out.read_text())
    assert result["round_ratios"] == pytest.approx([1.5, 2.2, 470 / 310])
    assert result["median_steps_per_s"] == {"jax": 450.0, "torch_eager": 300.0}
    assert result["ratio_of_medians"] == pytest.approx(1.5) and result["rounds_meeting_target"] == 3
    with pytest.raises(SystemExit):
        pairs.main(["--model", "mlp_vae", "--microbatch", "7"])
    assert "divide the batch size 100" in capsys.readouterr().err
    monkeypatch.setattr(pairs, "run_worker", lambda task, args: {"error": "worker exited with status 1: boom"})
    assert pairs.main(["--model", "gmvae", "--rounds", "1"]) == 1
    assert "boom" in capsys.readouterr().err
