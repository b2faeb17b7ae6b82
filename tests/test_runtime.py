"""dlvm_jax.runtime: repeated jitted calls stop page-faulting their temporaries in afresh, process-wide
(keep_freed_memory) or through XLA's heaps of temporaries (tuned_jit)."""

import json
import platform
import subprocess
import sys

import pytest

# A jitted function with an 80 MB temporary (the first matmul's output, which the second reads), called
# repeatedly; prints the minor page faults per call after warm-up.
PROGRAM = """
import json, resource, sys
from dlvm_jax.runtime import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
import jax, jax.numpy as jnp
f = jax.jit(lambda x, w: jnp.sum(jnp.tanh(x @ w) @ w.T, axis=0))
x, w = jnp.ones((10240, 8)), jnp.ones((8, 2048)) / 8
for _ in range(3):
    f(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    f(x, w).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
print(json.dumps({"applied": applied, "faults": faults}))
"""

PAGES = 10240 * 2048 * 4 // 4096  # pages of the temporary


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_keep_freed_memory_stops_page_faults():
    default, kept = _faults("default"), _faults("keep")
    assert kept["applied"] is True
    assert default["faults"] > 0.5 * PAGES  # glibc maps and unmaps the temporary at every call...
    assert kept["faults"] < 0.05 * PAGES  # ...and keeps it for the next call once told to


# Eight 8 MB arrays alive at once (42 MB of temporaries, over glibc's largest mmap threshold, 32 MiB), in XLA's one
# block of temporaries or in heaps of dlvm_jax.runtime.TEMP_HEAP_BYTES; prints the page faults of 10 calls.
HEAPS_PROGRAM = """
import json, resource, sys
from dlvm_jax import runtime
if sys.argv[1] == "one_block":
    runtime.TEMP_HEAP_BYTES = 0
import jax, jax.numpy as jnp

def f(x, w):
    h = [x]
    for _ in range(8):
        h.append(jnp.tanh(h[-1] @ w))
    return sum(jnp.sum(a * b) for a, b in zip(h, h[::-1]))

runtime.CPU_DOTS = "ynnpack"  # the heaps alone
g = runtime.tuned_jit(f)
x, w = jnp.ones((1024, 2048)), jnp.eye(2048) * 0.5
for _ in range(3):
    g(x, w).block_until_ready()
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    g(x, w).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": faults, "temp": g.lower(x, w).compile().memory_analysis().temp_size_in_bytes}))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_heaps_of_temporaries_are_reused_between_calls():
    """In one block, the temporaries are mapped afresh at every call; in heaps of TEMP_HEAP_BYTES, glibc serves
    them at least in part from memory it kept. Only in part: depending on the state of the thread's arena it still
    returns a heap to the system at some calls (under a loaded test run, the 24 MiB heap at every call), so the
    test asks for fewer page faults in all, not for none."""
    runs = {}
    for mode in ("one_block", "heaps"):
        out = subprocess.run([sys.executable, "-c", HEAPS_PROGRAM, mode], capture_output=True, text=True, check=True)
        runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    pages = runs["heaps"]["temp"] / 4096
    assert runs["one_block"]["temp"] == runs["heaps"]["temp"] > 32 << 20
    assert min(runs["one_block"]["faults"]) > 0.2 * pages
    assert sum(runs["heaps"]["faults"]) < 0.8 * sum(runs["one_block"]["faults"])


def test_temp_heap_options_only_for_cpu_computations_of_small_arrays(monkeypatch):
    """The option is chosen from the lowered computation: on the CPU, when no array is larger than a heap."""
    import jax
    import jax.numpy as jnp

    from dlvm_jax import runtime

    small = jax.jit(lambda x: jnp.tanh(x) @ x.T).lower(jnp.ones((100, 30)))
    big = jax.jit(lambda x: jnp.tanh(x) @ x.T).lower(jnp.ones((3000, 30)))  # a 36 MB output
    assert runtime.largest_array_bytes(small.as_text()) == 100 * 100 * 4
    assert runtime.largest_array_bytes(big.as_text()) == 3000 * 3000 * 4
    assert runtime.largest_array_bytes("func(%a: tensor<f32>, %b: tensor<2x3xi1>, %c: tensor<4x5xbf16>)") == 40
    assert runtime.temp_heap_options(small, platform="cpu") == {
        "xla_multiheap_size_constraint_per_heap": runtime.TEMP_HEAP_BYTES}
    assert runtime.temp_heap_options(big, platform="cpu") == {}
    assert runtime.temp_heap_options(small, platform="gpu") == {}
    monkeypatch.setattr(runtime, "TEMP_HEAP_BYTES", 0)
    assert runtime.temp_heap_options(small, platform="cpu") == {}


def test_tuned_jit_behaves_like_jit():
    """Same values as jax.jit, donation honoured, other shapes recompiled, ``lower`` available, name kept."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dlvm_jax.runtime import tuned_jit

    def step(state, x):
        return state + jnp.sum(jnp.tanh(x @ x.T)), jnp.mean(x)

    g = tuned_jit(step, donate_argnums=0)
    x = jax.random.normal(jax.random.key(0), (50, 20))
    state = jnp.ones(3)
    want = jax.jit(step)(jnp.ones(3), x)
    got = g(state, x)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    assert state.is_deleted()  # donated
    assert g(jnp.ones(3), x[:7])[1] == jnp.mean(x[:7])
    assert "tanh" in g.lower(jnp.ones(3), x).as_text()
    assert g.__name__ == "step"


def test_keep_freed_memory_is_a_no_op_elsewhere(monkeypatch):
    from dlvm_jax import runtime

    monkeypatch.setattr(runtime, "_applied", False)
    monkeypatch.setattr(runtime.platform, "system", lambda: "Darwin")
    assert runtime.keep_freed_memory() is False


def test_benchmark_compare_takes_each_frameworks_best(tmp_path):
    """benchmarks.compare sets each framework's fastest result over several runs against the other's, per setting,
    and names the run it came from."""
    import json

    from benchmarks import compare

    def run(jax_steps, eager_steps, jax_is, torch_is, malloc):
        return {"command": "python -m benchmarks", "machine": {"date": "2026-12-03", "malloc": malloc},
                "models": {"mlp_vae": {
                    "train_M1": {"jax_steps_per_s": jax_steps, "torch_eager_steps_per_s": eager_steps,
                                 "torch_compile_steps_per_s": None},
                    "is_K5000": {"jax_logw_per_s": jax_is, "torch_logw_per_s": torch_is}}}}

    files = []
    runs = [("default", run(700.0, 400.0, 5e5, 1.3e5, "defaults")), ("kept", run(600.0, 450.0, 4.5e5, 2.5e5, "kept"))]
    for name, r in runs:
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
        files.append(f"{name}={tmp_path / f'{name}.json'}")
    assert compare.main(files + ["--out", str(tmp_path / "best.json")]) == 0
    rows = {r["setting"]: r for r in json.loads((tmp_path / "best.json").read_text())["rows"]}
    train, is_ = rows["train_M1"], rows["is_K5000"]
    assert (train["jax"], train["jax_run"]) == (700.0, "default")
    assert (train["torch_eager"], train["torch_eager_run"]) == (450.0, "kept")
    assert train["ratio_vs_torch_eager"] == round(700 / 450, 3) and train["ratio_vs_torch_compile"] is None
    assert (is_["jax_run"], is_["torch_run"], is_["ratio_vs_torch"]) == ("default", "kept", 2.0)
    assert "| MLP VAE | train_M1 | 700 (default) | 450 (kept) | - | 1.56 | - |" in (tmp_path / "best.md").read_text()


def test_benchmark_command_hides_this_machines_paths(tmp_path):
    """The command recorded in the benchmark results shows folders outside the repository as DIR and those inside
    it relative to it."""
    from benchmarks.__main__ import ROOT, shown_command

    inside = str(ROOT / "benchmarks" / "results")
    assert (shown_command(["--out", str(tmp_path), f"--data-dir={tmp_path}", "--out", inside, "--quick"])
            == "python -m benchmarks --out DIR --data-dir=DIR --out benchmarks/results --quick")


def _mlp(w, x):
    import jax.numpy as jnp

    for _ in range(3):
        x = jnp.tanh(x @ w)
    return jnp.sum(x)


@pytest.mark.parametrize("library, ynn", [("ynnpack", True), ("eigen", False)])
def test_cpu_dots_choose_the_library_of_the_matrix_products(monkeypatch, library, ynn):
    """A fixed choice compiles the dots as YNNPACK fusions or as XLA's own dot thunks; values agree to round-off."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dlvm_jax import runtime

    if jax.default_backend() != "cpu":
        pytest.skip("XLA:CPU options")
    monkeypatch.setattr(runtime, "CPU_DOTS", library)
    w = jax.random.normal(jax.random.key(0), (64, 64)) / 8
    x = jax.random.normal(jax.random.key(1), (32, 64))
    g = runtime.tuned_jit(_mlp)
    np.testing.assert_allclose(g(w, x), jax.jit(_mlp)(w, x), rtol=1e-5)
    assert g.dot_library == library and g.dot_seconds == {}
    assert ("__ynn_fusion" in g.lower(w, x).compile().as_text()) == ynn
    monkeypatch.setattr(runtime, "CPU_DOTS", "mkl")
    with pytest.raises(ValueError, match="CPU_DOTS"):
        runtime.tuned_jit(_mlp)(w, x)


def test_auto_keeps_the_faster_library_and_remembers_it(monkeypatch):
    """``"auto"`` times both variants on copies of the donated arguments (the caller's are donated once, by the real
    call), keeps the faster, and reuses the choice for the same computation without timing it again; a computation
    under TUNE_MIN_FLOPS is not timed."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dlvm_jax import runtime

    if jax.default_backend() != "cpu":
        pytest.skip("XLA:CPU options")
    monkeypatch.setattr(runtime, "CPU_DOTS", "auto")
    monkeypatch.setattr(runtime, "TUNE_SECONDS", 0.01)
    monkeypatch.setattr(runtime, "_chosen", {})

    def step(state, x):
        return state + jnp.sum(jnp.tanh(x @ state[:, None] * x)), jnp.mean(x)

    x = jax.random.normal(jax.random.key(0), (200, 300))
    flops = runtime._flops(jax.jit(step).lower(jnp.ones(300), x))  # XLA's count: the dot's and the elementwise ops'
    assert flops >= 2 * 200 * 300
    monkeypatch.setattr(runtime, "TUNE_MIN_FLOPS", flops * 2)  # under it: not timed
    small = runtime.tuned_jit(step, donate_argnums=0)
    small(jnp.ones(300), x)
    assert small.dot_library == "ynnpack" and small.dot_seconds == {}

    monkeypatch.setattr(runtime, "TUNE_MIN_FLOPS", flops / 2)
    calls = {}
    timer = runtime._median_call_seconds

    def fake_timings(compiled, fresh_args):  # the real timer runs, then eigen is made the faster
        calls["n"] = calls.get("n", 0) + 1
        measured = timer(compiled, fresh_args)
        assert set(measured) == {"ynnpack", "eigen"} and all(t > 0 for t in measured.values())
        return {"ynnpack": 2.0, "eigen": 1.0}

    monkeypatch.setattr(runtime, "_median_call_seconds", fake_timings)
    state = jnp.ones(300)
    g = runtime.tuned_jit(step, donate_argnums=0)
    got = g(state, x)
    assert state.is_deleted()  # donated by the call, after the timed calls on copies
    want = jax.jit(step)(jnp.ones(300), x)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    assert g.dot_library == "eigen" and g.dot_seconds == {"ynnpack": 2.0, "eigen": 1.0} and calls["n"] == 1
    assert "__ynn_fusion" not in g.lower(jnp.ones(300), x).compile().as_text()
    again = runtime.tuned_jit(step, donate_argnums=0)
    again(jnp.ones(300), x)
    assert again.dot_library == "eigen" and again.dot_seconds == {} and calls["n"] == 1  # remembered


def test_scanned_epoch_takes_the_library_its_train_step_chooses(monkeypatch):
    """``make_epoch`` times its train step on the first batch (not the whole epoch) and compiles the epoch with the
    step's choice; the epoch's state is donated once, by the real call, and its values are those of ``jax.jit``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from dlvm_jax import runtime
    from dlvm_jax.train import epoch_fn, init_state, make_epoch

    if jax.default_backend() != "cpu":
        pytest.skip("XLA:CPU options")
    monkeypatch.setattr(runtime, "CPU_DOTS", "auto")
    monkeypatch.setattr(runtime, "TUNE_SECONDS", 0.01)
    monkeypatch.setattr(runtime, "TUNE_MIN_FLOPS", 1.0)
    monkeypatch.setattr(runtime, "_chosen", {})

    def loss_fn(params, batch, key, step):
        h = jnp.tanh(batch @ params["w"])
        loss = jnp.mean(jnp.square(h @ params["w"].T - batch))
        return loss, {"loss": loss}

    opt = optax.sgd(0.1)
    data = jax.random.normal(jax.random.key(0), (40, 30))
    fresh = lambda: init_state({"w": jax.random.normal(jax.random.key(1), (30, 20)) / 5}, opt, jax.random.key(2))
    want = jax.jit(epoch_fn(loss_fn, opt, batch_size=10))(fresh(), data)
    for library in ("eigen", "ynnpack"):
        timed_shapes = []

        def fake_timings(compiled, fresh_args, library=library):
            timed_shapes.append(fresh_args()[1].shape)
            return {"ynnpack": 1.0, "eigen": 1.0, library: 0.5}

        monkeypatch.setattr(runtime, "_median_call_seconds", fake_timings)
        monkeypatch.setattr(runtime, "_chosen", {})
        epoch = make_epoch(loss_fn, opt, batch_size=10)
        state = fresh()
        got = epoch(state, data)
        assert timed_shapes == [(10, 30)]  # the step, on one batch
        assert state.params["w"].is_deleted()
        assert epoch.dot_library == library
        assert ("__ynn_fusion" in epoch.lower(fresh(), data).compile().as_text()) == (library == "ynnpack")
        np.testing.assert_allclose(got[1]["loss"], want[1]["loss"], rtol=1e-5)
        np.testing.assert_allclose(got[0].params["w"], want[0].params["w"], rtol=1e-5, atol=1e-7)
