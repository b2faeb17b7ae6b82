"""Layer by layer: the conv VAE's convolutions in JAX (XLA:CPU) and PyTorch (oneDNN), forward and forward+backward.

    python -m benchmarks.profile_conv [--batch 100] [--decoder-rows 1000] [--out benchmarks/results/profile_conv.json]

Each layer of the conv VAE (dlvm_jax.networks.ConvEncoder / ConvDecoder) runs on a batch of random inputs: the
forward pass, and the gradient of sum(output^2) with respect to the weights and (except for the first layer) the
input. The decoder's two layers run in both of the library's formulations: XLA's convolutions differentiated by
XLA (``ConvDecoder(convs="xla")``) and the tap-map forms (``TapConv``, ``transpose2x``'s backward, the default).
The encoder's layers run as XLA's convolutions and in patch form (``PatchConv``, the default; the 64 -> 64 layer
in nine-tap patches, in row patches and in the 1-D Winograd form, its default). The last rows time
the whole decoder the way the ELBO/IWAE loss runs it, vmapped over examples with ``--decoder-rows`` / 100 latent
samples each (the M=10 train step), and the whole encoder vmapped over the batch (gradient with respect to the
weights only, as in training), in both formulations. Best of 5, milliseconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]  # see benchmarks.worker._no_tensorflow

OUT = Path(__file__).resolve().parent / "results" / "profile_conv.json"


def best_ms(fn: Callable[[], Any], repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(1e3 * min(times), 2)


def measure(name: str, jax_fwd: Callable[[], Any], jax_grad: Callable[[], Any], torch_fwd: Callable[[], Any],
            torch_grad: Callable[[], Any], **extra: Any) -> dict[str, Any]:
    """One row: best-of-5 milliseconds of each callable (JAX results waited for), printed as it is measured."""
    import jax

    row = {"layer": name, **extra,
           "jax_forward_ms": best_ms(lambda: jax.block_until_ready(jax_fwd())),
           "jax_forward_backward_ms": best_ms(lambda: jax.block_until_ready(jax_grad())),
           "torch_forward_ms": best_ms(torch_fwd), "torch_forward_backward_ms": best_ms(torch_grad)}
    print(f"{name:<42} JAX {row['jax_forward_ms']:7.1f} fwd {row['jax_forward_backward_ms']:7.1f} fwd+bwd | "
          f"PyTorch {row['torch_forward_ms']:7.1f} fwd {row['torch_forward_backward_ms']:7.1f} fwd+bwd", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_conv", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--decoder-rows", type=int, default=1000, help="rows through the vmapped decoder (1000)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import torch

    from benchmarks.common import write_result
    from benchmarks.worker import cores
    from dlvm_jax.networks import ConvDecoder, ConvEncoder, ConvTranspose2x, PatchConv, TapConv

    torch.set_num_threads(cores())
    b = args.batch
    layers = [
        ("conv 1->32, 28x28 (XLA)", nn.Conv(32, (3, 3), padding="SAME"), (b, 28, 28, 1),
         torch.nn.Conv2d(1, 32, 3, padding=1), (b, 1, 28, 28), False),
        ("conv 1->32, 28x28 (patches)", PatchConv(32), (b, 28, 28, 1),
         torch.nn.Conv2d(1, 32, 3, padding=1), (b, 1, 28, 28), False),
        ("conv 32->64, stride 2 (XLA)", nn.Conv(64, (3, 3), strides=(2, 2), padding="SAME"), (b, 28, 28, 32),
         torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), (b, 32, 28, 28), True),
        ("conv 32->64, stride 2 (patches)", PatchConv(64, 2), (b, 28, 28, 32),
         torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), (b, 32, 28, 28), True),
        ("conv 64->64, 14x14 (XLA)", nn.Conv(64, (3, 3), padding="SAME"), (b, 14, 14, 64),
         torch.nn.Conv2d(64, 64, 3, padding=1), (b, 64, 14, 14), True),
        ("conv 64->64, 14x14 (nine-tap patches)", PatchConv(64, form="patches"), (b, 14, 14, 64),
         torch.nn.Conv2d(64, 64, 3, padding=1), (b, 64, 14, 14), True),
        ("conv 64->64, 14x14 (row patches)", PatchConv(64, form="rows"), (b, 14, 14, 64),
         torch.nn.Conv2d(64, 64, 3, padding=1), (b, 64, 14, 14), True),
        ("conv 64->64, 14x14 (1-D Winograd)", PatchConv(64), (b, 14, 14, 64),
         torch.nn.Conv2d(64, 64, 3, padding=1), (b, 64, 14, 14), True),
        ("transposed conv 64->32, stride 2 (XLA)", ConvTranspose2x(32, taps=False), (b, 14, 14, 64),
         torch.nn.ConvTranspose2d(64, 32, 3, stride=2, padding=1, output_padding=1), (b, 64, 14, 14), True),
        ("transposed conv 64->32, stride 2 (taps)", ConvTranspose2x(32), (b, 14, 14, 64),
         torch.nn.ConvTranspose2d(64, 32, 3, stride=2, padding=1, output_padding=1), (b, 64, 14, 14), True),
        ("conv 32->1, 28x28 (XLA)", nn.Conv(1, (3, 3), padding="SAME"), (b, 28, 28, 32),
         torch.nn.Conv2d(32, 1, 3, padding=1), (b, 32, 28, 28), True),
        ("conv 32->1, 28x28 (taps)", TapConv(1), (b, 28, 28, 32),
         torch.nn.Conv2d(32, 1, 3, padding=1), (b, 32, 28, 28), True),
    ]
    rows = []
    print(f"batch {b}; milliseconds, best of 5")
    for name, jl, jshape, tl, tshape, input_grad in layers:
        x = jax.random.normal(jax.random.key(0), jshape)
        params = jl.init(jax.random.key(1), x)
        fwd = jax.jit(jl.apply)
        grad = jax.jit(jax.grad(lambda p, x, jl=jl: jnp.sum(jnp.square(jl.apply(p, x))),
                                argnums=(0, 1) if input_grad else 0))
        xt = torch.randn(tshape, requires_grad=input_grad)

        def torch_grad(tl=tl, xt=xt) -> None:
            tl.zero_grad()
            tl(xt).square().sum().backward()

        rows.append(measure(name, lambda: fwd(params, x), lambda: grad(params, x), lambda: tl(xt), torch_grad))

    # The whole decoder as the loss runs it: per example, vmapped over 100 examples of rows / 100 samples each.
    from benchmarks.torch_models import ConvDecoder as TorchDecoder

    rows_n = args.decoder_rows
    z = jax.random.normal(jax.random.key(0), (100, rows_n // 100, 2))
    zt = torch.randn(100 * (rows_n // 100), 2, requires_grad=True)
    torch_decoder = TorchDecoder(2, 1)

    def torch_decoder_grad() -> None:
        torch_decoder.zero_grad()
        torch_decoder(zt).square().sum().backward()

    for convs in ("xla", "taps"):
        decoder = ConvDecoder(1, convs=convs)
        params = decoder.init(jax.random.key(1), z[0])
        fwd = jax.jit(jax.vmap(decoder.apply, in_axes=(None, 0)))
        grad = jax.jit(jax.grad(lambda p, z, d=decoder: jnp.sum(jnp.square(jax.vmap(d.apply, in_axes=(None, 0))(p, z))),
                                argnums=(0, 1)))
        rows.append(measure(f"decoder, vmapped 100 x {rows_n // 100} ({convs})", lambda: fwd(params, z),
                            lambda: grad(params, z), lambda: torch_decoder(zt), torch_decoder_grad,
                            rows=100 * (rows_n // 100)))
    # The whole encoder as the loss runs it: per example, vmapped over the batch.
    from benchmarks.torch_models import ConvEncoder as TorchEncoder

    images = (jax.random.uniform(jax.random.key(0), (b, 28, 28, 1)) > 0.5).astype(jnp.float32)
    images_t = (torch.rand(b, 1, 28, 28) > 0.5).float()
    torch_encoder = TorchEncoder(4)

    def torch_encoder_grad() -> None:
        torch_encoder.zero_grad()
        torch_encoder(images_t).square().sum().backward()

    for convs in ("xla", "patches"):
        encoder = ConvEncoder(4, convs=convs)
        params = encoder.init(jax.random.key(1), images[0])
        fwd = jax.jit(jax.vmap(encoder.apply, in_axes=(None, 0)))
        grad = jax.jit(jax.grad(lambda p, x, e=encoder: jnp.sum(jnp.square(jax.vmap(e.apply, in_axes=(None, 0))(p, x)))))
        rows.append(measure(f"encoder, vmapped over {b} ({convs})", lambda: fwd(params, images),
                            lambda: grad(params, images), lambda: torch_encoder(images_t), torch_encoder_grad))
    write_result(args.out, {"batch": b, "layers": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
