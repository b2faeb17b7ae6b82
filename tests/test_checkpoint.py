"""checkpoint.py and the fit loops' checkpoints: resume gives the same parameters and metrics as a run never
interrupted; damaged or foreign checkpoints are refused in one line with every file left as it was; non-finite
steps stop the run (naming step and term) or are skipped.

An interruption is simulated exactly: a complete run is made, then its checkpoints after some step are deleted,
while the metrics log keeps the records written after that step (as when a process is killed between two
checkpoints). tests/test_cli.py kills a real process with SIGKILL.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dlvm_jax import train
from dlvm_jax.checkpoint import CheckpointError, Checkpoints

OPT = optax.adam(1e-2)
X = np.asarray(jax.random.normal(jax.random.key(0), (80, 6)))  # 5 batches of 16 per epoch
X_TEST = np.asarray(jax.random.normal(jax.random.key(9), (30, 6)))


class Toy:
    """A model that compiles in a blink but uses everything a VAE's training uses: a key per step (noise), Adam
    state, several metrics; ``log_weights`` lets fit_restarts score it."""

    def __init__(self, dim: int = 6) -> None:
        self.dim = dim

    def init(self, key: jax.Array) -> dict:
        return {"w": jax.random.normal(key, (self.dim,)), "b": jnp.ones(3)}

    def log_weights(self, params: dict, x: jax.Array, key: jax.Array, num_samples: int) -> jax.Array:
        noise = jax.random.normal(key, (num_samples,) + x.shape)
        return -jnp.sum(jnp.square(x + 0.1 * noise - params["w"]), axis=-1)


MODEL = Toy()


def LOSS(params, batch, key, step):  # noqa: N802 - a loss function, named like the module's other constants
    noise = 0.1 * jax.random.normal(key, batch.shape)
    rec = jnp.mean(jnp.sum(jnp.square(batch + noise - params["w"]), axis=-1))
    penalty = jnp.sum(jnp.square(params["b"]))
    return rec + penalty, {"loss": rec + penalty, "rec": rec, "penalty": penalty}


def _run(folder: Path, *, scan: bool, resume: bool = False, epochs: int = 4, data: np.ndarray = X,
         fingerprint: dict | None = None, batch_size: int = 16) -> tuple[train.TrainState, list[dict]]:
    state = train.init_state(MODEL.init(jax.random.key(1)), OPT, jax.random.key(2))
    return train.fit(state, data, loss_fn=LOSS, optimizer=OPT, batch_size=batch_size, epochs=epochs,
                     test_data=X_TEST, eval_every=2, metrics_path=folder / "metrics.jsonl",
                     checkpoint_path=folder / "params.msgpack", checkpoint_dir=folder / "ckpt", checkpoint_every=7,
                     keep_checkpoints=10, progress=False, scan=scan, resume=resume, fingerprint=fingerprint)


def _without_seconds(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in train.read_jsonl(path)]


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and the SHA-256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def complete_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """One complete 4-epoch run (20 steps, checkpoints at 0, 7, 14, 20 stepped / 0, 10, 15, 20 scanned) per mode."""
    out = {}
    for scan in (True, False):
        folder = tmp_path_factory.mktemp(f"complete-scan{scan}")
        _run(folder, scan=scan)
        out[scan] = folder
    return out


@pytest.mark.parametrize("scan, cut", [(True, 15), (False, 14)])
def test_resume_after_interruption_gives_the_same_run(complete_runs, tmp_path, scan, cut):
    """scan=True checkpoints at the end of the epoch a multiple of 7 steps falls in (10, 15); scan=False exactly
    on it (7, 14: in the middle of epoch 3, so the resumed run re-derives that epoch's data order from the saved
    key and finishes it). Parameters and every metric (all but the wall-clock seconds) are bitwise equal, and
    the metrics log has each evaluation once."""
    reference = complete_runs[scan]
    expected_steps = [0, 10, 15, 20] if scan else [0, 7, 14, 20]
    assert Checkpoints(reference / "ckpt").steps() == expected_steps
    folder = tmp_path / "run"
    shutil.copytree(reference, folder)
    for step in Checkpoints(folder / "ckpt").steps():
        if step > cut:
            shutil.rmtree(folder / "ckpt" / str(step))  # "killed" after checkpoint `cut` ...
    assert len(train.read_jsonl(folder / "metrics.jsonl")) == 3  # ... whose log already had later records
    meta = Checkpoints(folder / "ckpt").read_meta()
    assert meta["step"] == cut and (meta["batch"] > 0) == (not scan)
    state, history = _run(folder, scan=scan, resume=True)
    ref_params = train.load_params(reference / "params.msgpack", jax.device_get(state.params))
    chex.assert_trees_all_equal(jax.device_get(state.params), ref_params)
    assert _without_seconds(folder / "metrics.jsonl") == _without_seconds(reference / "metrics.jsonl")
    assert [r["epoch"] for r in train.read_jsonl(folder / "metrics.jsonl")] == [0, 2, 4]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in history] == _without_seconds(
        reference / "metrics.jsonl")
    assert int(state.step) == 20


def test_checkpoint_holds_the_whole_state(complete_runs):
    """Parameters, optimizer state, PRNG key (typed, restored as a key), step, the epoch's data-order key and
    the position in the epoch; the orbax items, no pickles; the last `keep` kept."""
    folder = complete_runs[False] / "ckpt"
    state = train.init_state(MODEL.init(jax.random.key(1)), OPT, jax.random.key(2))
    tree, meta = Checkpoints(folder).restore({"state": state, "epoch_key": state.key}, step=14)
    assert int(tree["state"].step) == 14 and meta["epoch"] == 2 and meta["batch"] == 4
    assert jnp.issubdtype(tree["state"].key.dtype, jax.dtypes.prng_key)
    assert int(tree["state"].opt_state[0].count) == 14
    assert len(meta["partial"]["metrics"]["loss"]["values"]) == 4  # the part-done epoch's per-step metrics
    paths = [d["path"] for d in meta["leaves"]]
    assert {"epoch_key", "state/key", "state/step"} <= set(paths), paths
    assert any(p.startswith("state/params/") for p in paths) and any(p.startswith("state/opt_state/0/mu/") for p in paths)
    assert not list(folder.rglob("*.pkl")) and not list(folder.rglob("*.pickle"))
    kept = Checkpoints(folder, max_to_keep=2)
    kept.save(30, {"x": jnp.ones(2)}, {"note": "a"})
    assert kept.steps() == [20, 30]  # the two latest
    assert not kept.save(30, {"x": jnp.ones(2)}, {"note": "again"})  # an existing step is not rewritten


def _array_file(step_dir: Path) -> Path:
    """The largest file of a checkpoint's arrays (orbax's OCDBT data; where small arrays go varies)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["truncate", "flip", "meta"])
def test_damaged_checkpoint_is_refused_and_left_alone(complete_runs, tmp_path, assert_one_line, damage):
    folder = tmp_path / "run"
    shutil.copytree(complete_runs[True], folder)
    step_dir = folder / "ckpt" / "20"
    if damage == "meta":
        (step_dir / "meta" / "metadata").write_text('{"epoch": 4, "hist', encoding="utf-8")
    else:
        target = _array_file(step_dir)
        raw = bytearray(target.read_bytes())
        if damage == "truncate":
            del raw[len(raw) // 2:]
        else:  # bits flipped inside the array data, size unchanged
            for i in range(len(raw) // 4, len(raw) // 4 + 16):
                raw[i] ^= 0xFF
        target.write_bytes(bytes(raw))
    before = _snapshot(folder)
    with pytest.raises(CheckpointError, match=r"checkpoint .*20 is truncated or corrupted: file '.*' (has \d+ "
                                              r"bytes where \d+ were written|does not match its recorded SHA-256); "
                                              r"delete that folder to resume from step 15") as err:
        _run(folder, scan=True, resume=True)
    assert_one_line(err.value)
    assert _snapshot(folder) == before  # nothing written, nothing cut


def test_leaf_digests_catch_damage_without_a_manifest(complete_runs, tmp_path):
    """A checkpoint whose process died before its file manifest was written is still used; damage to its array
    bytes is then caught by the per-array SHA-256 recorded in its metadata."""
    folder = tmp_path / "ckpt"
    shutil.copytree(complete_runs[True] / "ckpt", folder)
    (folder / "20" / "dlvm_files.json").unlink()
    state = train.init_state(MODEL.init(jax.random.key(1)), OPT, jax.random.key(2))
    template = {"state": state, "epoch_key": state.key}
    tree, meta = Checkpoints(folder).restore(template)
    assert meta["step"] == 20 and int(tree["state"].step) == 20
    meta_path = folder / "20" / "meta" / "metadata"
    record = json.loads(meta_path.read_text())
    record["leaves"][-1]["sha256"] = "0" * 32  # as if the bytes of that array had changed
    meta_path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"is corrupted: array 'state/step' does not match its recorded "
                                              r"SHA-256; delete that folder to resume from step 15"):
        Checkpoints(folder).restore(template)


def test_foreign_checkpoints_are_refused(complete_runs, tmp_path, assert_one_line):
    folder = tmp_path / "run"
    shutil.copytree(complete_runs[True], folder)
    before = _snapshot(folder)
    # Another configuration (as the CLI describes it): named key and both values.
    with pytest.raises(CheckpointError, match=r"another model or configuration: config\.latent_dim is "
                                              r"not set there and 3 here") as err:
        _run(folder, scan=True, resume=True, fingerprint={"latent_dim": 3})
    assert_one_line(err.value)
    # Data of another width: named shapes.
    with pytest.raises(CheckpointError, match=r"training data has shape \(80, 7\), but checkpoint .* shape "
                                              r"\(80, 6\)") as err:
        _run(folder, scan=True, resume=True, data=np.zeros((80, 7), np.float32))
    assert_one_line(err.value)
    # Another batch size.
    with pytest.raises(CheckpointError, match=r"batch_size is 16 there and 8 here"):
        _run(folder, scan=True, resume=True, batch_size=8)
    # Another model (same configuration label): the first array whose shape differs.
    state = train.init_state(Toy(7).init(jax.random.key(1)), OPT, jax.random.key(2))
    with pytest.raises(CheckpointError, match=r"belongs to another model or configuration: array "
                                              r"'state/params/w' has shape \[6\] there, \[7\] in this "
                                              r"run") as err:
        Checkpoints(folder / "ckpt").restore({"state": state, "epoch_key": state.key})
    assert_one_line(err.value)
    assert _snapshot(folder) == before


def test_fresh_run_refuses_old_checkpoints_and_resume_needs_one(complete_runs, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(complete_runs[True], folder)
    with pytest.raises(ValueError, match=r"already holds checkpoints \(steps 0, 10, 15, 20\); resume"):
        _run(folder, scan=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        _run(tmp_path / "empty", scan=True, resume=True)


def _sentinel_loss(params, batch, key, step):
    """The loss, made NaN (value and gradient) for any batch holding the sentinel row (x[0] = 1e6)."""
    loss, metrics = LOSS(params, batch, key, step)
    factor = jnp.where(jnp.any(batch[:, 0] > 1e5), jnp.nan, 1.0)
    return loss * factor, dict(metrics, rec=metrics["rec"] * factor, loss=loss * factor)


def test_non_finite_step_stops_with_step_and_term_and_keeps_checkpoint(tmp_path, assert_one_line):
    data = X.copy()
    data[37, 0] = 1e6  # one poisoned row, in whichever batch the shuffle of epoch 1 puts it
    state = train.init_state(MODEL.init(jax.random.key(1)), OPT, jax.random.key(2))
    with pytest.raises(FloatingPointError, match=r"training went non-finite in epoch 1 at step [1-5] \(batch [1-5] "
                                                 r"of 5\): loss terms 'loss', 'rec' and gradients of 'b', 'w'; "
                                                 r"the last good checkpoint \(step 0\) is kept in .*; lower the "
                                                 r"learning rate, or skip such updates") as err:
        train.fit(state, data, loss_fn=_sentinel_loss, optimizer=OPT, batch_size=16, epochs=3, eval_every=1,
                  metrics_path=tmp_path / "m.jsonl", checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert_one_line(err.value)
    assert Checkpoints(tmp_path / "ckpt").steps() == [0]
    assert [r["epoch"] for r in train.read_jsonl(tmp_path / "m.jsonl")] == [0]  # the bad epoch is not recorded

    # skip_nonfinite: the poisoned batch's update is skipped (one per epoch), everything else trains.
    state = train.init_state(MODEL.init(jax.random.key(1)), OPT, jax.random.key(2))
    state, history = train.fit(state, data, loss_fn=_sentinel_loss, optimizer=OPT, batch_size=16, epochs=3,
                               progress=False, skip_nonfinite=True)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(state.params))
    # 80 rows in batches of 16 leave no remainder: the poisoned row is in exactly one batch of every epoch.
    assert [h["train_skipped_steps"] for h in history[1:]] == [1, 1, 1]
    assert all(np.isfinite(h["train_loss"]) for h in history[1:])  # the means leave the skipped steps out


def test_non_finite_gradient_alone_is_named():
    """A finite loss with an infinite gradient (d sqrt(u)/du at u = 0) names the parameter."""

    def loss_fn(params, batch, key, step):
        loss = jnp.sum(jnp.sqrt(jnp.abs(params["w"]))) + 0.0 * jnp.mean(batch)
        return loss, {"loss": loss}

    state = train.init_state({"w": jnp.zeros(2), "v": jnp.ones(2)}, optax.sgd(0.1), jax.random.key(0))
    with pytest.raises(FloatingPointError, match=r"step 1 \(batch 1 of 2\): gradient of 'w'; no checkpoints"):
        train.fit(state, np.ones((16, 3), np.float32), loss_fn=loss_fn, optimizer=optax.sgd(0.1), batch_size=8,
                  epochs=1, progress=False)


def test_fit_restarts_resume(tmp_path):
    """Restarts side by side: a run resumed from its epoch-2 checkpoint ends as the uninterrupted one."""
    kwargs = dict(init_fn=MODEL.init, loss_fn=LOSS, optimizer=OPT, key=jax.random.key(0), restarts=2,
                  batch_size=16, epochs=3, test_data=X_TEST, eval_every=1, progress=False, checkpoint_every=10)
    a, ha, sa = train.fit_restarts(MODEL, X, metrics_path=tmp_path / "a.jsonl", checkpoint_dir=tmp_path / "a", **kwargs)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.copy(tmp_path / "a.jsonl", tmp_path / "b.jsonl")
    assert Checkpoints(tmp_path / "b").steps() == [0, 10, 15]
    shutil.rmtree(tmp_path / "b" / "15")
    b, hb, sb = train.fit_restarts(MODEL, X, metrics_path=tmp_path / "b.jsonl", checkpoint_dir=tmp_path / "b",
                                   resume=True, **kwargs)
    chex.assert_trees_all_equal(jax.device_get(a.params), jax.device_get(b.params))
    assert sa["chosen"] == sb["chosen"] and sa["train_objective"] == sb["train_objective"]
    strip = lambda path: [{k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
                          for r in train.read_jsonl(path) if "selection" not in r]
    assert strip(tmp_path / "a.jsonl") == strip(tmp_path / "b.jsonl")
    assert sum("selection" in r for r in train.read_jsonl(tmp_path / "b.jsonl")) == 1
