"""The ``dlvm`` command: thin argument parsing around the library.

    dlvm train vae [options]          train a model, write a run directory
    dlvm evaluate RUN_DIR [options]   importance-sampled test log-likelihood of a trained run
    dlvm sample RUN_DIR [options]     draw from the prior, write a PNG (and optionally .npy)
    dlvm predict RUN_DIR --data X.npy --out Y.npy   cluster assignments (models that define them)

Model kinds live in :data:`MODEL_KINDS`: a :class:`ModelKind` bundles how to parse a model's options, build its
config and model, its losses, initialisation and (optionally) predictions. ``dlvm train <kind>`` gets one
sub-command per registered kind, and a run directory records its kind in ``config.json`` so that ``evaluate``,
``sample`` and ``predict`` rebuild the right model. Adding a model = one ``register_model(ModelKind(...))``.

User mistakes (bad data, bad options, a missing run directory) end in ONE line ``dlvm: error: ...`` on stderr and
exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

PROG = "dlvm"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
PARAMS_FILE = "params.msgpack"
SUMMARY_FILE = "summary.json"
EVALUATION_FILE = "evaluation.json"
CONFIG_FORMAT = 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse with errors on ONE line, ``dlvm: error: ...``, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{PROG}: error: {message} (see '{self.prog} --help')\n")
        sys.exit(2)


# ------------------------------------------------------------------------------------------------------------
# Configs (frozen dataclasses, written to config.json)
# ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where the data comes from: a built-in name (see :data:`DATASETS`) or the absolute path of an (N, D) .npy
    file; the train/test split is :func:`dlvm_jax.data.split` with ``test_fraction`` and ``split_seed``."""

    source: str = "digits"
    test_fraction: float = 0.2
    split_seed: int = 0
    data_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation options (Adam)."""

    epochs: int = 200
    batch_size: int = 100
    lr: float = 1e-3
    seed: int = 0
    eval_every: int = 10
    time_limit: float | None = None
    restarts: int = 1

    def __post_init__(self) -> None:
        if self.restarts < 1:
            raise ValueError(f"--restarts must be >= 1, got {self.restarts}")
        if self.epochs < 0:
            raise ValueError(f"--epochs must be >= 0, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.eval_every < 1:
            raise ValueError(f"--eval-every must be >= 1, got {self.eval_every}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"--time-limit must be > 0 seconds, got {self.time_limit}")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Training objective of a VAE (see :func:`dlvm_jax.objectives.make_loss`)."""

    objective: str = "elbo"
    num_samples: int = 1
    analytic_kl: bool = True
    beta: float = 1.0
    warmup_steps: int = 0


# ------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------


def _digits(spec: DataSpec) -> Any:
    from dlvm_jax import data

    return data.digits(test_fraction=spec.test_fraction, seed=spec.split_seed)


def _spiral(spec: DataSpec) -> Any:
    from dlvm_jax import data

    return data.spiral(seed=spec.split_seed, test_fraction=spec.test_fraction)


def _paper_spiral(spec: DataSpec) -> Any:
    from dlvm_jax import data

    x, y = data.paper_spiral(spec.data_dir)
    return data.Dataset(*data.split(x, y, test_fraction=spec.test_fraction, seed=spec.split_seed),
                        name="spiral-paper")


def _mnist(spec: DataSpec) -> Any:
    from dlvm_jax import data

    return data.mnist(spec.data_dir)


def _binarized_mnist(spec: DataSpec) -> Any:
    from dlvm_jax import data

    return data.binarized_mnist(spec.data_dir)


def _fashion_mnist(spec: DataSpec) -> Any:
    from dlvm_jax import data

    return data.fashion_mnist(spec.data_dir)


#: Built-in data sets by name: ``fn(spec) -> data.Dataset``. The MNIST family has fixed train/test files
#: (``test_fraction`` and ``split_seed`` do not apply) and flat (784,) examples in [0, 1].
DATASETS: dict[str, Callable[[DataSpec], Any]] = {
    "digits": _digits,  # scikit-learn's 8x8 digits, no download
    "spiral": _spiral,  # generated five-arc spiral, no download
    "spiral-paper": _paper_spiral,  # the GMVAE paper's spiral.npy under the data folder
    "mnist": _mnist,  # DATA_DIR/mnist: the four IDX files, grey levels / 255; 60,000 train / 10,000 test
    "binarized-mnist": _binarized_mnist,  # DATA_DIR/binarized_mnist: Larochelle & Murray's .amat; 50,000 / 10,000
    "fashion-mnist": _fashion_mnist,  # DATA_DIR/fashion_mnist (or Debian's /usr/share/datasets/fashion-mnist)
}

#: Default likelihood per built-in data set (anything else: gaussian). Grey levels in [0, 1] get the continuous
#: Bernoulli (a normalised density on [0, 1], so log p(x) is a true log-density; a Bernoulli on grey levels is
#: not, and its numbers compare with neither binarized-MNIST nor continuous results); --likelihood bernoulli
#: still gives the classic (unnormalised) choice. The fixed 0/1 binarization gets the Bernoulli.
DEFAULT_LIKELIHOOD = {
    "digits": "continuous_bernoulli",
    "mnist": "continuous_bernoulli",
    "fashion-mnist": "continuous_bernoulli",
    "binarized-mnist": "bernoulli",
}


def resolve_source(source: str, data_dir: str | os.PathLike | None) -> str:
    """A built-in data-set name unchanged, or the absolute path of a .npy file (looked up as given, then under
    the data folder)."""
    if source in DATASETS:
        return source
    path = Path(source).expanduser()
    if not path.is_file() and data_dir is not None and not path.is_absolute() and (Path(data_dir) / path).is_file():
        path = Path(data_dir) / path
    if not path.is_file():
        names = ", ".join(DATASETS)
        raise FileNotFoundError(f"--data {source!r} is neither a built-in data set ({names}) nor an existing "
                                ".npy file")
    return str(path.resolve())


def load_data(spec: DataSpec, likelihood: str | None = None) -> Any:
    """The train/test :class:`dlvm_jax.data.Dataset` of ``spec``, validated for ``likelihood``."""
    from dlvm_jax import data

    if spec.source in DATASETS:
        ds = DATASETS[spec.source](spec)
    else:
        x = data.load_npy(spec.source)
        ds = data.Dataset(*data.split(x, None, test_fraction=spec.test_fraction, seed=spec.split_seed),
                          name=Path(spec.source).name)
    name = ds.name or spec.source
    return ds._replace(x_train=data.validate(ds.x_train, name=f"{name} (train)", likelihood=likelihood),
                       x_test=data.validate(ds.x_test, name=f"{name} (test)", likelihood=likelihood))


# ------------------------------------------------------------------------------------------------------------
# Model kinds
# ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """How the CLI handles one kind of model.

    add_arguments(parser): the model's own options on ``dlvm train <name>``.
    make_config(args, dataset, likelihood) -> model config;  config_cls(**dict) rebuilds it from config.json.
    make_objective(args) -> objective config;  objective_cls(**dict) rebuilds it.
    build(config) -> model (``init``, ``log_weights``, ``sample``, ``reconstruct`` ...).
    make_losses(model, objective) -> (train loss_fn, test loss_fn); the test loss must report ``elbo``.
    init(model, key, dataset) -> params.
    predict(model, params, x) -> array of per-example predictions (None: ``dlvm predict`` refuses).
    figures(run_dir, model, params, dataset, key) -> extra figure paths written after training (optional).
    defaults: this kind's defaults for ``data``, ``epochs``, ``batch_size``, ``lr``, ``eval_every``, ``restarts``.

    The model's ``sample(params, key, num)`` and ``reconstruct(params, x)`` (when present) make the standard
    figures; ``log_weights`` makes ``dlvm evaluate`` work.
    """

    name: str
    help: str
    config_cls: type
    objective_cls: type
    add_arguments: Callable[[argparse.ArgumentParser], None]
    make_config: Callable[[argparse.Namespace, Any, str], Any]
    make_objective: Callable[[argparse.Namespace], Any]
    build: Callable[[Any], Any]
    make_losses: Callable[[Any, Any], tuple[Callable, Callable]]
    init: Callable[[Any, Any, Any], Any]
    predict: Callable[[Any, Any, np.ndarray], np.ndarray] | None = None
    figures: Callable[[Path, Any, Any, Any, Any], list[Path]] | None = None
    #: Defaults of ``--data`` and the training options for this kind (the rest: :class:`TrainConfig`).
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)


MODEL_KINDS: dict[str, ModelKind] = {}


def register_model(kind: ModelKind) -> ModelKind:
    MODEL_KINDS[kind.name] = kind
    return kind


def parse_int_list(text: str) -> tuple[int, ...]:
    """``"128,128"`` -> (128, 128); ``""`` or ``"none"`` -> () (no hidden layer)."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        values = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 128,128, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"layer widths must be >= 1, got {text!r}")
    return values


def add_vae_arguments(p: argparse.ArgumentParser) -> None:
    from dlvm_jax.models.vae import NETWORKS
    from dlvm_jax.networks import ACTIVATIONS
    from dlvm_jax.objectives import OBJECTIVES

    g = p.add_argument_group("model")
    g.add_argument("--network", choices=NETWORKS, default="mlp", help="encoder/decoder networks (conv: 28x28x1 "
                   "images only) [mlp]")
    g.add_argument("--latent-dim", type=int, default=None,
                   help="latent dimensions [2 for data of <= 10 features, else 16]")
    g.add_argument("--hidden", type=parse_int_list, default=None,
                   help="MLP hidden widths, comma-separated [64,64 for <= 10 features, else 200,200]")
    g.add_argument("--activation", choices=sorted(ACTIVATIONS), default="relu",
                   help="MLP activation [relu; with tanh the digits model tends to ignore its latents]")
    g = p.add_argument_group("objective")
    g.add_argument("--objective", choices=OBJECTIVES, default="elbo", help="training objective [elbo]")
    g.add_argument("--num-samples", "-K", type=int, default=1, metavar="K",
                   help="samples per example: Monte-Carlo samples (elbo) or importance samples (iwae) [1]")
    kl = g.add_mutually_exclusive_group()
    kl.add_argument("--analytic-kl", dest="analytic_kl", action="store_true", default=True,
                    help="closed-form KL(q || p) in the ELBO (default)")
    kl.add_argument("--mc-kl", dest="analytic_kl", action="store_false", help="Monte-Carlo KL in the ELBO")
    g.add_argument("--beta", type=float, default=1.0, help="KL weight (elbo) [1.0]")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear KL warm-up from 0 to beta over N steps [0]")


def vae_config(args: argparse.Namespace, dataset: Any, likelihood: str) -> Any:
    from dlvm_jax.models.vae import VAEConfig

    shape = dataset.data_shape
    small = int(np.prod(shape)) <= 10
    latent = args.latent_dim if args.latent_dim is not None else (2 if small else 16)
    hidden = args.hidden if args.hidden is not None else ((64, 64) if small else (200, 200))
    return VAEConfig(data_shape=shape, latent_dim=latent, hidden=hidden, activation=args.activation,
                     likelihood=likelihood, network=args.network)


def vae_objective(args: argparse.Namespace) -> ObjectiveConfig:
    from dlvm_jax.objectives import check_num_samples

    check_num_samples(args.num_samples, "--num-samples")
    if args.beta < 0:
        raise ValueError(f"--beta must be >= 0, got {args.beta}")
    if args.warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    return ObjectiveConfig(objective=args.objective, num_samples=args.num_samples, analytic_kl=args.analytic_kl,
                           beta=args.beta, warmup_steps=args.warmup_steps)


def vae_losses(model: Any, obj: ObjectiveConfig) -> tuple[Callable, Callable]:
    from dlvm_jax.objectives import make_loss

    train_loss = make_loss(model, objective=obj.objective, num_samples=obj.num_samples,
                           analytic_kl=obj.analytic_kl, beta=obj.beta, warmup_steps=obj.warmup_steps)
    # Test numbers are always the plain ELBO (beta = 1, analytic KL, one sample), whatever the training objective.
    return train_loss, make_loss(model, objective="elbo", num_samples=1, analytic_kl=True)


def vae_init(model: Any, key: Any, dataset: Any) -> Any:
    mean = dataset.x_train.mean(0) if model.config.likelihood == "bernoulli" else None
    return model.init(key, mean)


def _build_vae(config: Any) -> Any:
    from dlvm_jax.models.vae import VAE

    return VAE(config)


def _vae_config_cls() -> type:
    from dlvm_jax.models.vae import VAEConfig

    return VAEConfig


register_model(ModelKind(
    name="vae",
    help="variational autoencoder (Gaussian q(z|x), N(0, I) prior), ELBO or IWAE objective",
    config_cls=_vae_config_cls(),
    objective_cls=ObjectiveConfig,
    add_arguments=add_vae_arguments,
    make_config=vae_config,
    make_objective=vae_objective,
    build=_build_vae,
    make_losses=vae_losses,
    init=vae_init,
))


@dataclasses.dataclass(frozen=True)
class GMVAEObjective:
    """Training objective of a GMVAE (see :func:`dlvm_jax.models.gmvae.make_gmvae_loss`)."""

    num_samples: int = 1
    free_bits: float = 0.5


def add_gmvae_arguments(p: argparse.ArgumentParser) -> None:
    from dlvm_jax.models.gmvae import GMVAEConfig
    from dlvm_jax.networks import ACTIVATIONS

    d, o = GMVAEConfig(), GMVAEObjective()
    g = p.add_argument_group("model")
    g.add_argument("--clusters", "-k", type=int, default=d.clusters, metavar="K",
                   help=f"mixture components (clusters) [{d.clusters}]")
    g.add_argument("--local-dim", type=int, default=d.local_dim, help=f"dimensions of l (the paper's x) [{d.local_dim}]")
    g.add_argument("--global-dim", type=int, default=d.global_dim, help=f"dimensions of w [{d.global_dim}]")
    g.add_argument("--hidden", type=parse_int_list, default=d.hidden,
                   help=f"encoder/decoder hidden widths [{','.join(map(str, d.hidden))}]")
    g.add_argument("--prior-hidden", type=parse_int_list, default=d.prior_hidden,
                   help=f"hidden widths of the w -> (mu_k, sigma_k) network [{','.join(map(str, d.prior_hidden))}]")
    g.add_argument("--activation", choices=sorted(ACTIVATIONS), default=d.activation, help=f"[{d.activation}]")
    g = p.add_argument_group("objective")
    g.add_argument("--num-samples", "-M", type=int, default=o.num_samples, metavar="M",
                   help=f"Monte Carlo samples of (w, l) per example [{o.num_samples}]")
    g.add_argument("--free-bits", type=float, default=o.free_bits, metavar="LAMBDA",
                   help=f"the z-prior term stops pushing below LAMBDA nats [{o.free_bits}]")


def gmvae_config(args: argparse.Namespace, dataset: Any, likelihood: str) -> Any:
    from dlvm_jax.models.gmvae import GMVAEConfig

    return GMVAEConfig(data_shape=dataset.data_shape, clusters=args.clusters, local_dim=args.local_dim,
                       global_dim=args.global_dim, hidden=args.hidden, prior_hidden=args.prior_hidden,
                       activation=args.activation, likelihood=likelihood)


def gmvae_objective(args: argparse.Namespace) -> GMVAEObjective:
    from dlvm_jax.objectives import check_num_samples

    check_num_samples(args.num_samples, "--num-samples")
    if args.free_bits < 0:
        raise ValueError(f"--free-bits must be >= 0, got {args.free_bits}")
    return GMVAEObjective(num_samples=args.num_samples, free_bits=args.free_bits)


def gmvae_losses(model: Any, obj: GMVAEObjective) -> tuple[Callable, Callable]:
    from dlvm_jax.models.gmvae import make_gmvae_loss

    # Test numbers: the unclamped objective (lambda = 0) with one sample, whatever the training settings.
    return (make_gmvae_loss(model, num_samples=obj.num_samples, free_bits=obj.free_bits),
            make_gmvae_loss(model, num_samples=1, free_bits=0.0))


def gmvae_predict(model: Any, params: Any, x: np.ndarray) -> np.ndarray:
    import jax

    return np.asarray(jax.jit(model.predict)(params, x))


def gmvae_figures(run_dir: Path, model: Any, params: Any, dataset: Any, key: Any) -> list[Path]:
    """clusters.png for 2-D data: KDE contours of decoded samples per cluster; the data by cluster."""
    from dlvm_jax import plots

    x = np.concatenate([dataset.x_train, dataset.x_test])
    if x.ndim != 2 or x.shape[1] != 2:
        return []
    samples = np.asarray(model.sample_clusters(params, key, 2000))
    return [plots.cluster_figure(list(samples), x, gmvae_predict(model, params, x), run_dir / "clusters.png",
                                 title=f"GMVAE, K={model.config.clusters}, on {dataset.name}")]


def _build_gmvae(config: Any) -> Any:
    from dlvm_jax.models.gmvae import GMVAE

    return GMVAE(config)


def _gmvae_config_cls() -> type:
    from dlvm_jax.models.gmvae import GMVAEConfig

    return GMVAEConfig


register_model(ModelKind(
    name="gmvae",
    help="Gaussian-mixture VAE (Dilokthanakul et al. 2016) for unsupervised clustering",
    config_cls=_gmvae_config_cls(),
    objective_cls=GMVAEObjective,
    add_arguments=add_gmvae_arguments,
    make_config=gmvae_config,
    make_objective=gmvae_objective,
    build=_build_gmvae,
    make_losses=gmvae_losses,
    init=lambda model, key, dataset: model.init(key),
    predict=gmvae_predict,
    figures=gmvae_figures,
    defaults={"data": "spiral", "epochs": 600, "batch_size": 200, "lr": 1e-3, "eval_every": 100, "restarts": 4},
))


# ------------------------------------------------------------------------------------------------------------
# Run directories
# ------------------------------------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n", encoding="utf-8")


def _fields(cls: type, d: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"{cls.__name__} in {CONFIG_FILE} has unknown fields {sorted(unknown)}")
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class Run:
    """A trained run rebuilt from its directory."""

    path: Path
    kind: ModelKind
    model_config: Any
    objective: Any
    data: DataSpec
    train: TrainConfig
    model: Any
    params: Any


def load_run(run_dir: str | os.PathLike, *, data_dir: str | None = None) -> Run:
    """Rebuild the model of ``run_dir`` from config.json and load its parameters (into a fresh template)."""
    import jax

    from dlvm_jax import train

    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"no run directory at {path}")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path} is not a run directory: it has no {CONFIG_FILE}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"cannot read {cfg_path}: {err}") from None
    kind_name = cfg.get("model")
    if kind_name not in MODEL_KINDS:
        raise ValueError(f"{cfg_path} names an unknown model kind {kind_name!r}; known: {', '.join(MODEL_KINDS)}")
    kind = MODEL_KINDS[kind_name]
    model_config = _fields(kind.config_cls, cfg["model_config"])
    objective = _fields(kind.objective_cls, cfg["objective"])
    data_spec = _fields(DataSpec, cfg["data"])
    if data_dir is not None:
        data_spec = dataclasses.replace(data_spec, data_dir=str(data_dir))
    train_cfg = _fields(TrainConfig, cfg["train"])
    model = kind.build(model_config)
    template = jax.eval_shape(model.init, jax.random.key(0))  # structure and shapes only, nothing computed
    params = train.load_params(path / PARAMS_FILE, template)
    expected = jax.tree.map(lambda a: tuple(a.shape), template)
    found = jax.tree.map(lambda a: tuple(np.shape(a)), params)
    if expected != found:
        raise ValueError(f"{path / PARAMS_FILE} does not match the model in {CONFIG_FILE} (parameter shapes differ)")
    return Run(path, kind, model_config, objective, data_spec, train_cfg, model, params)


def _new_run_dir(run_dir: str | None, kind: str) -> Path:
    if run_dir is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = os.path.join("runs", f"{kind}-{stamp}")
    path = Path(run_dir)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"run directory {path} already exists and is not empty; choose another --run-dir")
    return path


# ------------------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------------------


def sample_figure(model: Any, params: Any, key: Any, path: Path, *, num: int, reference: np.ndarray | None,
                  title: str) -> np.ndarray:
    """Draw ``num`` samples (means of p(x|z), z ~ p(z)); write an image grid, or a scatter against
    ``reference`` for non-image data. Returns the samples."""
    from dlvm_jax import plots

    samples = np.asarray(model.sample(params, key, num))
    if plots.image_side(samples.shape[1:]) is not None:
        plots.image_grid(samples, path, title)
    elif samples.ndim == 2 and samples.shape[1] >= 2:
        ref = reference if reference is not None else samples[:0]
        plots.scatter(ref, samples, path, title)
    else:
        raise ValueError(f"no figure for samples of shape {samples.shape[1:]}; use --npy to save them")
    return samples


def write_figures(run_dir: Path, model: Any, params: Any, dataset: Any, history: list[dict[str, Any]],
                  key: Any) -> list[Path]:
    """reconstructions.png (image data), samples.png and training_curves.png."""
    import jax

    from dlvm_jax import plots

    written = [plots.training_curves(history, run_dir / "training_curves.png",
                                     title=f"{dataset.name}: {model.config.likelihood} likelihood")]
    x = np.asarray(dataset.x_test)
    image = plots.image_side(x.shape[1:]) is not None
    if image and hasattr(model, "reconstruct"):
        originals = x[:10]
        recon = jax.vmap(lambda xi: model.reconstruct(params, xi))(originals)
        written.append(plots.reconstruction_grid(originals, np.asarray(recon), run_dir / "reconstructions.png"))
    if image or (x.ndim == 2 and x.shape[1] >= 2):
        num = 64 if image else min(2000, max(500, x.shape[0]))
        sample_figure(model, params, key, run_dir / "samples.png", num=num, reference=x,
                      title="samples from the model (means of p(x|z), z ~ p(z))")
        written.append(run_dir / "samples.png")
    return written


# ------------------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------------------


def add_data_arguments(p: argparse.ArgumentParser, default: str = "digits") -> None:
    from dlvm_jax.distributions import LIKELIHOODS

    g = p.add_argument_group("data")
    g.add_argument("--data", default=default, metavar="NAME|PATH.npy",
                   help=f"built-in data ({', '.join(DATASETS)}) or an (N, D) .npy file [{default}]")
    g.add_argument("--data-dir", default=None, help="data folder (default: $DLVM_DATA_DIR)")
    g.add_argument("--likelihood", choices=LIKELIHOODS, default=None,
                   help="p(x|z) family [continuous_bernoulli for digits, gaussian otherwise]")
    g.add_argument("--test-fraction", type=float, default=0.2, help="held-out share of the data [0.2]")


def add_train_arguments(p: argparse.ArgumentParser, defaults: dict[str, Any] | None = None) -> None:
    d = dataclasses.replace(TrainConfig(), **{k: v for k, v in (defaults or {}).items() if k != "data"})
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=d.epochs, help=f"passes over the training data [{d.epochs}]")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"[{d.batch_size}]")
    g.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate [{d.lr}]")
    g.add_argument("--seed", type=int, default=d.seed, help=f"initialisation and training randomness [{d.seed}]")
    g.add_argument("--eval-every", type=int, default=d.eval_every,
                   help=f"test ELBO and checkpoint every N epochs [{d.eval_every}]")
    g.add_argument("--restarts", type=int, default=d.restarts,
                   help=f"independent initialisations trained side by side (vmap); the one with the best "
                        f"training objective over the training data is kept [{d.restarts}]")
    g.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop after the first epoch that ends past this many seconds")
    g.add_argument("--run-dir", default=None, help="output folder [runs/<model>-<timestamp>]")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def cmd_train(args: argparse.Namespace) -> int:
    import jax
    import optax

    from dlvm_jax import data, train

    kind = MODEL_KINDS[args.model]
    folder = data.data_dir(args.data_dir)
    spec = DataSpec(source=resolve_source(args.data, folder), test_fraction=args.test_fraction,
                    data_dir=str(folder) if folder is not None else None)
    likelihood = args.likelihood or DEFAULT_LIKELIHOOD.get(spec.source, "gaussian")
    dataset = load_data(spec, likelihood)
    model_config = kind.make_config(args, dataset, likelihood)
    objective = kind.make_objective(args)
    train_cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            eval_every=args.eval_every, time_limit=args.time_limit, restarts=args.restarts)
    train.check_batch_size(train_cfg.batch_size, dataset.x_train.shape[0])
    model = kind.build(model_config)
    train_loss, test_loss = kind.make_losses(model, objective)

    run_dir = _new_run_dir(args.run_dir, kind.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / CONFIG_FILE, {
        "format": CONFIG_FORMAT,
        "model": kind.name,
        "model_config": dataclasses.asdict(model_config),
        "objective": dataclasses.asdict(objective),
        "data": dataclasses.asdict(spec),
        "train": dataclasses.asdict(train_cfg),
        "num_train": int(dataset.x_train.shape[0]),
        "num_test": int(dataset.x_test.shape[0]),
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "jax_backend": jax.default_backend(),
    })
    print(f"{PROG}: training {kind.name} on {dataset.name} ({dataset.x_train.shape[0]} train / "
          f"{dataset.x_test.shape[0]} test, shape {dataset.data_shape}), {likelihood} likelihood, "
          f"{train_cfg.epochs} epochs -> {run_dir}", flush=True)

    start = time.perf_counter()
    k_init, k_train, k_eval, k_fig = jax.random.split(jax.random.key(train_cfg.seed), 4)
    optimizer = optax.adam(train_cfg.lr)
    selection = None
    if train_cfg.restarts == 1:
        state = train.init_state(kind.init(model, k_init, dataset), optimizer, k_train)
        state, history = train.fit(
            state, dataset.x_train, loss_fn=train_loss, optimizer=optimizer, batch_size=train_cfg.batch_size,
            epochs=train_cfg.epochs, test_data=dataset.x_test, eval_loss_fn=test_loss,
            eval_every=train_cfg.eval_every, metrics_path=run_dir / METRICS_FILE,
            checkpoint_path=run_dir / PARAMS_FILE, time_limit=train_cfg.time_limit, progress=args.progress,
            eval_key=k_eval,
            # Convolution gradients compile to far slower CPU code inside lax.scan: step them one by one.
            scan=getattr(model_config, "network", "mlp") != "conv")
    else:
        state, history, selection = train.fit_restarts(
            model, dataset.x_train, init_fn=lambda k: kind.init(model, k, dataset), loss_fn=train_loss,
            optimizer=optimizer, key=k_train, restarts=train_cfg.restarts, batch_size=train_cfg.batch_size,
            epochs=train_cfg.epochs, test_data=dataset.x_test, eval_loss_fn=test_loss,
            eval_every=train_cfg.eval_every, metrics_path=run_dir / METRICS_FILE, time_limit=train_cfg.time_limit,
            progress=args.progress)
        train.save_params(run_dir / PARAMS_FILE, state.params)
        print(f"kept restart {selection['chosen']} of {train_cfg.restarts}, the best training objective ("
              f"{', '.join(f'{v:.3f}' for v in selection['train_objective'])}; importance-sampled log p(x), K="
              f"{selection['score_samples']}: {', '.join(f'{v:.3f}' for v in selection['train_log_px'])})")
    train_seconds = history[-1]["seconds"]
    figures = write_figures(run_dir, model, state.params, dataset, history, k_fig)
    if kind.figures is not None:
        figures += kind.figures(run_dir, model, state.params, dataset, k_fig)

    first, last = history[0], history[-1]
    summary = {
        "model": kind.name,
        "data": dataset.name,
        "likelihood": likelihood,
        "initial_test_elbo": first["test_elbo"],
        "final_test_elbo": last["test_elbo"],
        "improvement": last["test_elbo"] - first["test_elbo"],
        "epochs": last["epoch"],
        "steps": last["step"],
        "seconds": train_seconds,
        "total_seconds": round(time.perf_counter() - start, 3),
        "stopped_by_time_limit": last["epoch"] < train_cfg.epochs,
        "final_train_loss": last.get("train_loss"),
    }
    if selection is not None:
        summary["restarts"] = selection
    if kind.predict is not None and dataset.y_train is not None:
        from dlvm_jax import metrics

        for split_name, x, y in (("train", dataset.x_train, dataset.y_train), ("test", dataset.x_test, dataset.y_test)):
            scores = metrics.clustering_scores(y, np.asarray(kind.predict(model, state.params, x)))
            summary[f"{split_name}_clustering"] = scores
            print(f"clustering of the {split_name} data ({len(y)} points): accuracy {scores['accuracy']:.4f} "
                  f"(Hungarian), NMI {scores['nmi']:.4f}, ARI {scores['ari']:.4f}, "
                  f"{scores['clusters_used']} clusters used")
    write_json(run_dir / SUMMARY_FILE, summary)
    print(f"test ELBO (nats per example): {summary['initial_test_elbo']:.2f} at initialisation -> "
          f"{summary['final_test_elbo']:.2f} after {summary['epochs']} epochs "
          f"({summary['improvement']:+.2f}; {train_seconds:.1f} s training)")
    print(f"run directory {run_dir}: {CONFIG_FILE}, {METRICS_FILE}, {PARAMS_FILE}, {SUMMARY_FILE}, "
          + ", ".join(p.name for p in figures))
    print(f"next: {PROG} evaluate {run_dir}   |   {PROG} sample {run_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import jax

    from dlvm_jax import likelihood as lik
    from dlvm_jax.objectives import check_num_samples

    check_num_samples(args.num_samples, "--num-samples")
    check_num_samples(args.chunk_size, "--chunk-size")
    check_num_samples(args.batch_size, "--batch-size")
    if args.max_examples is not None and args.max_examples < 1:
        raise ValueError(f"--max-examples must be >= 1, got {args.max_examples}")
    run = load_run(args.run_dir, data_dir=args.data_dir)
    dataset = load_data(run.data, run.model_config.likelihood)
    x = dataset.x_test if args.max_examples is None else dataset.x_test[: args.max_examples]
    start = time.perf_counter()
    est = lik.log_likelihood(run.model, run.params, x, jax.random.key(args.seed), num_samples=args.num_samples,
                             chunk_size=args.chunk_size, batch_size=args.batch_size, progress=args.progress)
    result = est.summary()
    result.update({"num_samples": args.num_samples, "chunk_size": args.chunk_size, "seed": args.seed,
                   "split": "test", "seconds": round(time.perf_counter() - start, 3)})
    write_json(run.path / EVALUATION_FILE, result)
    print(f"test log p(x) ~= {result['log_px']:.3f} +- {result['log_px_se_over_data']:.3f} (s.e. over "
          f"{result['num_examples']} examples; Monte-Carlo s.e. {result['log_px_mc_se']:.3f}), "
          f"K = {args.num_samples} importance samples")
    print(f"ELBO on the same samples {result['elbo']:.3f}; mean effective sample size {result['ess_mean']:.1f} "
          f"of {args.num_samples}")
    print(f"written to {run.path / EVALUATION_FILE} ({result['seconds']:.1f} s)")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import jax

    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    run = load_run(args.run_dir, data_dir=args.data_dir)
    out = Path(args.out) if args.out else run.path / f"samples-seed{args.seed}.png"
    reference = None
    try:
        reference = np.asarray(load_data(run.data).x_test)
    except (ValueError, FileNotFoundError):
        pass  # the data is only the backdrop of a scatter plot
    samples = sample_figure(run.model, run.params, jax.random.key(args.seed), out, num=args.num,
                            reference=reference, title=f"{args.num} samples from {run.path.name}")
    print(f"wrote {out}")
    if args.npy:
        np.save(args.npy, samples)
        print(f"wrote {args.npy} (array of shape {samples.shape})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from dlvm_jax import data

    run = load_run(args.run_dir)
    if run.kind.predict is None:
        raise ValueError(f"'{PROG} predict' needs a model that assigns clusters (such as gmvae); "
                         f"{run.path} holds a {run.kind.name} model")
    x = data.validate(data.load_npy(args.data), name=args.data, likelihood=run.model_config.likelihood,
                      data_shape=run.model_config.data_shape)
    pred = np.asarray(run.kind.predict(run.model, run.params, x))
    np.save(args.out, pred)
    print(f"wrote {args.out} (array of shape {pred.shape})")
    return 0


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Deep latent variable models in JAX: train, evaluate, sample.")
    from dlvm_jax import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p_train = sub.add_parser("train", help="train a model and write a run directory")
    models = p_train.add_subparsers(dest="model", metavar="MODEL", required=True)
    for kind in MODEL_KINDS.values():
        p = models.add_parser(kind.name, help=kind.help, description=f"Train a {kind.help}.")
        add_data_arguments(p, kind.defaults.get("data", "digits"))
        kind.add_arguments(p)
        add_train_arguments(p, kind.defaults)
        p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="importance-sampled test log-likelihood of a run")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--num-samples", "-K", type=int, default=5000, metavar="K", help="importance samples [5000]")
    p.add_argument("--chunk-size", type=int, default=500, help="samples drawn at once per example [500]")
    p.add_argument("--batch-size", type=int, default=100, help="examples per batch [100]")
    p.add_argument("--max-examples", type=int, default=None, metavar="N", help="only the first N test examples")
    p.add_argument("--seed", type=int, default=0, help="[0]")
    p.add_argument("--data-dir", default=None, help="data folder, if it moved since training")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sample", help="draw samples from the prior and write a figure")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--num", type=int, default=64, help="number of samples [64]")
    p.add_argument("--out", default=None, metavar="PATH.png", help="[RUN_DIR/samples-seed<SEED>.png]")
    p.add_argument("--npy", default=None, metavar="PATH.npy", help="also save the samples as an array")
    p.add_argument("--seed", type=int, default=0, help="[0]")
    p.add_argument("--data-dir", default=None, help="data folder, if it moved since training")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("predict", help="per-example predictions (cluster assignments) of a clustering model")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--data", required=True, metavar="PATH.npy", help="(N, D) array to assign")
    p.add_argument("--out", required=True, metavar="OUT.npy", help="where to write the predictions")
    p.set_defaults(func=cmd_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dlvm`` console script; returns the exit status (2 for user errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FloatingPointError, IsADirectoryError, PermissionError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        sys.stderr.write(f"{PROG}: error: {message}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
