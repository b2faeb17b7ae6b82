"""Where the time of the conv VAE's gradient goes, by layer, from a ``jax.profiler`` trace of XLA's CPU kernels.

    python -m benchmarks.profile_conv_step [--samples 1] [--keep-freed-memory] [--out FILE]

The gradient of the conv VAE loss of ``python -m benchmarks`` (batch 100; ELBO with one sample, IWAE with more) is
compiled, run ``--repeats`` times under the profiler (XLA's per-kernel trace events switched on with
``--xla_cpu_enable_xprof_traceme``), and every kernel's time is attributed to the layer named in its HLO metadata
(or in that of the instructions fused into it), forward or backward. Milliseconds per gradient evaluation.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import sys
import tempfile
from pathlib import Path

sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]  # see benchmarks.worker._no_tensorflow
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

OUT = Path(__file__).resolve().parent / "results" / "profile_conv_step.json"
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) .*")
_OP_NAME = re.compile(r'op_name="([^"]+)"')
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_COMPUTATION = re.compile(r"^%?([\w.\-]+) \(.*\{$")


def kernel_layers(hlo: str, kernels: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (layer label, output shape), the label from the instruction's op_name or, for a
    fusion without one, from the op_names of the instructions inside its fused computation. XLA's rewrite of a
    convolution's weight gradient carries no op_name; a kernel whose output holds the entries of a layer's
    kernel (``kernels``: layer -> kernel shape; the same dimensions in any order) is labelled as that gradient."""
    inner: dict[str, list[str]] = collections.defaultdict(list)
    current = None
    for line in hlo.splitlines():
        head = _COMPUTATION.match(line.strip())
        if head:
            current = head.group(1)
        elif current and (m := _OP_NAME.search(line)):
            inner[current].append(m.group(1))
    out = {}
    for line in hlo.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        names = [n.group(1)] if (n := _OP_NAME.search(line)) else []
        if not names and (c := _CALLS.search(line)):
            names = inner.get(c.group(1), [])
        if names:
            out[m.group(1)] = (label(names[0]), m.group(2))
            continue
        dims = tuple(int(d) for d in re.findall(r"\d+", m.group(2).split("{")[0][4:]))
        # XLA's weight-gradient convolution writes (C_in, kh, kw, C_out); any order of the dimensions otherwise.
        owners = ([layer for layer, (kh, kw, cin, cout) in kernels.items() if (cin, kh, kw, cout) == dims]
                  or [layer for layer, shape in kernels.items() if sorted(shape) == sorted(dims)])
        out[m.group(1)] = (f"{' or '.join(owners)}, weight gradient" if owners else "unattributed", m.group(2))
    return out


def label(op_name: str) -> str:
    parts = op_name.split("/")
    net = "encoder" if any("Encoder" in p for p in parts) else "decoder" if any("Decoder" in p for p in parts) else ""
    layer = next((p for p in parts if re.fullmatch(r"(Conv|ConvTranspose|Dense)_\d+", p)), "")
    direction = "backward" if any(p.startswith("transpose(") for p in parts) else "forward"
    where = f"{net} {layer}".strip() or "loss, sampling, likelihood"
    return f"{where}, {direction}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_conv_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=1, help="Monte Carlo samples M (1: ELBO, more: IWAE)")
    p.add_argument("--microbatch", type=int, default=0,
                   help="accumulate the gradient over microbatches of this many examples "
                        "(dlvm_jax.objectives.microbatched; 0: the whole batch at once)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="dlvm_jax.runtime.keep_freed_memory first (no page faults on the temporaries)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    if args.keep_freed_memory:
        from dlvm_jax.runtime import keep_freed_memory

        keep_freed_memory()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.common import write_result
    from benchmarks.worker import _jax_model
    from dlvm_jax.objectives import microbatched, value_and_grad
    from dlvm_jax.runtime import tuned_jit

    model, loss_fn = _jax_model("conv_vae", args.samples)
    params = jax.jit(model.init)(jax.random.key(0))
    batch = jnp.asarray((np.random.default_rng(0).random((100, 28, 28, 1)) < 0.13).astype(np.float32))
    if args.microbatch:
        loss_fn = microbatched(loss_fn, args.microbatch)
    # the gradient as make_train_step computes it
    grad = tuned_jit(lambda p, b, k: value_and_grad(loss_fn, p, b, k, jnp.zeros((), jnp.int32))[1])
    key = jax.random.key(1)
    kernels = {f"{net} {layer}": tuple(leaves["kernel"].shape)
               for net, layers_ in params.items() for layer, leaves in layers_.items() if layer.startswith("Conv")}
    layers = kernel_layers(grad.lower(params, batch, key).compile().as_text(), kernels)
    jax.block_until_ready(grad(params, batch, key))

    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.repeats):
                jax.block_until_ready(grad(params, batch, key))
        trace_file = next(Path(trace_dir).rglob("*.trace.json.gz"))
        events = json.loads(gzip.open(trace_file).read())
    events = events["traceEvents"] if isinstance(events, dict) else events
    per_kernel: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in layers:
            per_kernel[e["name"]] += e["dur"] / 1e3 / args.repeats
    wall = [e["dur"] / 1e3 for e in events if e.get("ph") == "X" and "block_until_ready" in e.get("name", "")]
    by_layer: collections.Counter = collections.Counter()
    for name, ms in per_kernel.items():
        by_layer[layers[name][0]] += ms

    total = sum(per_kernel.values())
    print(f"conv VAE gradient, batch 100, M={args.samples}, microbatch {args.microbatch or 'none'}: "
          f"{np.median(wall):.1f} ms a call (median), {total:.1f} ms in XLA kernels")
    for name, ms in by_layer.most_common():
        print(f"  {ms:7.1f} ms  {name}")
    write_result(args.out, {
        "samples": args.samples, "batch": 100, "microbatch": args.microbatch,
        "keep_freed_memory": args.keep_freed_memory,
        "call_ms_median": round(float(np.median(wall)), 2),
        "kernel_ms_total": round(total, 2), "by_layer_ms": {k: round(v, 2) for k, v in by_layer.most_common()},
        "top_kernels": [{"kernel": k, "layer": layers[k][0], "shape": layers[k][1], "ms": round(v, 2)}
                        for k, v in per_kernel.most_common(25)]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
