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
CHECKPOINT_DIR = "checkpoints"
CONFIG_FORMAT = 1
#: Options of ``dlvm train`` that ``--resume`` may change (the rest are fixed by the run's config.json).
RESUME_OPTIONS = ("epochs", "time_limit", "progress", "devices", "data_dir", "skip_nonfinite", "resume")
#: TrainConfig fields that do not change what a run computes (left out of the checkpoint fingerprint).
_NOT_FINGERPRINTED = ("epochs", "time_limit", "checkpoint_every", "keep_checkpoints", "skip_nonfinite")


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
    checkpoint_every: int | None = None
    keep_checkpoints: int = 3
    skip_nonfinite: bool = False
    microbatch: int | None = None

    def __post_init__(self) -> None:
        if self.microbatch is not None and (self.microbatch < 1 or self.batch_size % self.microbatch):
            raise ValueError(f"--microbatch must divide the batch size {self.batch_size}, got {self.microbatch}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError(f"--checkpoint-every must be >= 1 steps, got {self.checkpoint_every}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}")
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
    estimator: str = "reparam"


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
    from dlvm_jax.objectives import ESTIMATORS, OBJECTIVES

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
    g.add_argument("--estimator", choices=ESTIMATORS, default="reparam",
                   help="gradient estimator: reparam (pathwise), stl (sticking the landing; Monte-Carlo KL) or score "
                        "(score function with a leave-one-out baseline; elbo, K >= 2) [reparam]")


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
    if args.estimator == "score" and args.objective != "elbo":
        raise ValueError("--estimator score works with --objective elbo; use reparam or stl with iwae")
    if args.estimator == "score" and args.num_samples < 2:
        raise ValueError(f"--estimator score needs -K 2 or more (its baseline leaves one sample out), got "
                         f"{args.num_samples}")
    return ObjectiveConfig(objective=args.objective, num_samples=args.num_samples, analytic_kl=args.analytic_kl,
                           beta=args.beta, warmup_steps=args.warmup_steps, estimator=args.estimator)


def vae_losses(model: Any, obj: ObjectiveConfig) -> tuple[Callable, Callable]:
    from dlvm_jax.objectives import make_loss

    train_loss = make_loss(model, objective=obj.objective, num_samples=obj.num_samples,
                           analytic_kl=obj.analytic_kl, beta=obj.beta, warmup_steps=obj.warmup_steps,
                           estimator=obj.estimator)
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


def closest(name: str, choices: Any) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to a mistyped ``name``, or ``""``."""
    import difflib

    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _fields(cls: type, d: dict[str, Any], where: str = CONFIG_FILE) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__} in {where} must be a JSON object, got {type(d).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"{cls.__name__} in {where} has unknown field {unknown[0]!r}{closest(unknown[0], names)}")
    try:
        return cls(**d)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{cls.__name__} in {where}: {str(err).strip().splitlines()[0]}") from None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What a run directory's config.json says (everything but the trained parameters)."""

    path: Path
    kind: ModelKind
    model_config: Any
    objective: Any
    data: DataSpec
    train: TrainConfig
    raw: dict[str, Any]


def read_run_config(run_dir: str | os.PathLike, *, data_dir: str | None = None) -> RunConfig:
    """Read and check ``run_dir``/config.json (``data_dir`` replaces the data folder it names)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"no run directory at {path}")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path} is not a run directory: it has no {CONFIG_FILE}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {cfg_path}: {err}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path} is not a JSON object")
    kind_name = cfg.get("model")
    if kind_name not in MODEL_KINDS:
        raise ValueError(f"{cfg_path} names an unknown model kind {kind_name!r}; known: {', '.join(MODEL_KINDS)}")
    for section in ("model_config", "objective", "data", "train"):
        if section not in cfg:
            raise ValueError(f"{cfg_path} has no {section!r} section{closest(section, list(cfg))}")
    kind = MODEL_KINDS[kind_name]
    model_config = _fields(kind.config_cls, cfg["model_config"], str(cfg_path))
    objective = _fields(kind.objective_cls, cfg["objective"], str(cfg_path))
    data_spec = _fields(DataSpec, cfg["data"], str(cfg_path))
    if data_dir is not None:
        data_spec = dataclasses.replace(data_spec, data_dir=str(data_dir))
    train_cfg = _fields(TrainConfig, cfg["train"], str(cfg_path))
    return RunConfig(path, kind, model_config, objective, data_spec, train_cfg, cfg)


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

    rc = read_run_config(run_dir, data_dir=data_dir)
    path = rc.path
    model = rc.kind.build(rc.model_config)
    template = jax.eval_shape(model.init, jax.random.key(0))  # structure and shapes only, nothing computed
    params = train.load_params(path / PARAMS_FILE, template)
    expected = jax.tree.map(lambda a: tuple(a.shape), template)
    found = jax.tree.map(lambda a: tuple(np.shape(a)), params)
    if expected != found:
        raise ValueError(f"{path / PARAMS_FILE} does not match the model in {CONFIG_FILE} (parameter shapes differ)")
    return Run(path, rc.kind, rc.model_config, rc.objective, rc.data, rc.train, model, params)


def check_writable(path: Path, *, option: str = "--run-dir") -> Path:
    """Create ``path`` (a folder) if needed and make sure files can be written in it; one line if not."""
    import tempfile

    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".dlvm-write-test-"):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise PermissionError(f"cannot write to the run directory {path} ({reason}); choose another {option}"
                              ) from None
    return path


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
    g.add_argument("--microbatch", type=int, default=d.microbatch, metavar="N",
                   help="accumulate each step's gradient over microbatches of N examples (VAE only; faster for conv "
                        "networks on a CPU, see dlvm_jax.objectives.microbatched) [the whole batch at once]")
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
    g = p.add_argument_group("devices, checkpoints and faults")
    g.add_argument("--devices", type=int, default=None, metavar="N",
                   help="split each batch over the first N devices [all devices JAX sees; the batch size must be "
                        "a multiple of N]")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, metavar="STEPS",
                   help="orbax checkpoint (RUN_DIR/checkpoints) every STEPS training steps, at the end of the epoch "
                        "they fall in (conv networks: exactly) [at every evaluation]; always at the start and the end")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, metavar="N",
                   help=f"how many of the latest checkpoints to keep [{d.keep_checkpoints}]")
    g.add_argument("--skip-nonfinite", action="store_true", default=d.skip_nonfinite,
                   help="skip updates whose loss or gradient is non-finite (counted in train_skipped_steps) "
                        "instead of stopping the run")
    g.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue RUN_DIR from its latest checkpoint with its own config.json (only --epochs, "
                        "--time-limit, --devices, --data-dir, --skip-nonfinite and --no-progress may change)")
    g.add_argument("--config", default=None, metavar="FILE.json",
                   help="a JSON object of option values (keys: the long option names, e.g. "
                        "{\"epochs\": 50, \"batch_size\": 200}); options on the command line win")


def _fingerprint(kind_name: str, model_config: Any, objective: Any, spec: DataSpec, train_cfg: TrainConfig
                 ) -> dict[str, Any]:
    """What a checkpoint must have been written for: model, objective, data and the options that change the
    computation (not the data folder, epochs, time limit or checkpoint cadence)."""
    data_spec = dataclasses.asdict(spec)
    data_spec.pop("data_dir", None)
    return {"model": kind_name, "model_config": dataclasses.asdict(model_config),
            "objective": dataclasses.asdict(objective), "data": data_spec,
            "train": {k: v for k, v in dataclasses.asdict(train_cfg).items() if k not in _NOT_FINGERPRINTED}}


def _mesh(devices: int | None, batch_size: int) -> Any:
    from dlvm_jax import parallel

    mesh = parallel.make_mesh(devices)
    parallel.check_divisible(batch_size, mesh)
    return mesh


def cmd_train(args: argparse.Namespace) -> int:
    import jax

    from dlvm_jax import data, train

    if args.model is None:
        if args.top_resume is None:
            raise ValueError(f"choose a model to train ({PROG} train {{{','.join(MODEL_KINDS)}}} [options]) or "
                             f"continue a run ({PROG} train --resume RUN_DIR)")
        return _resume(args, Path(args.top_resume), epochs=args.top_epochs, time_limit=args.top_time_limit,
                       devices=args.top_devices, data_dir=args.top_data_dir, skip_nonfinite=args.top_skip_nonfinite,
                       progress=args.top_progress)
    if args.resume is not None:
        _refuse_changed_options(args)
        default_epochs = args.train_parser.get_default("epochs")
        return _resume(args, Path(args.resume), epochs=None if args.epochs == default_epochs else args.epochs,
                       time_limit=args.time_limit, devices=args.devices, data_dir=args.data_dir,
                       skip_nonfinite=args.skip_nonfinite, progress=args.progress)

    kind = MODEL_KINDS[args.model]
    folder = data.data_dir(args.data_dir)
    spec = DataSpec(source=resolve_source(args.data, folder), test_fraction=args.test_fraction,
                    data_dir=str(folder) if folder is not None else None)
    likelihood = args.likelihood or DEFAULT_LIKELIHOOD.get(spec.source, "gaussian")
    dataset = load_data(spec, likelihood)
    model_config = kind.make_config(args, dataset, likelihood)
    objective = kind.make_objective(args)
    train_cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            eval_every=args.eval_every, time_limit=args.time_limit, restarts=args.restarts,
                            checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                            skip_nonfinite=args.skip_nonfinite, microbatch=args.microbatch)
    if train_cfg.microbatch and kind.name != "vae":
        raise ValueError(f"--microbatch is for the VAE, whose loss is a mean over examples; the {kind.name}'s is not")
    train.check_batch_size(train_cfg.batch_size, dataset.x_train.shape[0])
    mesh = _mesh(args.devices, train_cfg.batch_size)

    run_dir = check_writable(_new_run_dir(args.run_dir, kind.name))
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
    return _train(run_dir, kind, model_config, objective, spec, train_cfg, dataset, mesh=mesh,
                  progress=args.progress)


def check_data_shape(dataset: Any, model_config: Any, run_dir: Path, spec: DataSpec) -> None:
    """One line if the run's data no longer has the example shape the model was trained on."""
    trained = tuple(model_config.data_shape)
    if tuple(dataset.data_shape) != trained:
        raise ValueError(f"the data of {run_dir} ({spec.source}) now has examples of shape "
                         f"{tuple(dataset.data_shape)}, but the run was trained on shape {trained}; restore the "
                         "original data or start a new run")


def _refuse_changed_options(args: argparse.Namespace) -> None:
    """With ``--resume``, every option but :data:`RESUME_OPTIONS` comes from the run's config.json: refuse others."""
    parser = args.train_parser
    if getattr(args, "config", None):
        raise ValueError(f"--config cannot be used with --resume: {args.resume} keeps its own {CONFIG_FILE}")
    for action in parser._actions:
        dest = action.dest
        if not action.option_strings or dest in RESUME_OPTIONS or dest == "help":
            continue
        if getattr(args, dest, None) != parser.get_default(dest):
            raise ValueError(f"{action.option_strings[-1]} cannot be changed when resuming: {args.resume} keeps "
                             f"its own {CONFIG_FILE} (only --epochs, --time-limit, --devices, --data-dir, "
                             "--skip-nonfinite and --no-progress may change); start a new run instead")


def _resume(args: argparse.Namespace, run_dir: Path, *, epochs: int | None, time_limit: float | None,
            devices: int | None, data_dir: str | None, skip_nonfinite: bool, progress: bool) -> int:
    from dlvm_jax.checkpoint import Checkpoints

    rc = read_run_config(run_dir, data_dir=data_dir)
    if args.model is not None and args.model != rc.kind.name:
        raise ValueError(f"{run_dir} holds a {rc.kind.name} run, not a {args.model} one; resume it with "
                         f"'{PROG} train --resume {run_dir}'")
    changes: dict[str, Any] = {}
    if epochs is not None:
        changes["epochs"] = epochs
    if time_limit is not None:
        changes["time_limit"] = time_limit
    if skip_nonfinite:
        changes["skip_nonfinite"] = True
    train_cfg = dataclasses.replace(rc.train, **changes)
    dataset = load_data(rc.data, rc.model_config.likelihood)
    check_data_shape(dataset, rc.model_config, run_dir, rc.data)
    num_train = rc.raw.get("num_train")
    if num_train is not None and int(num_train) != dataset.x_train.shape[0]:
        raise ValueError(f"the training data of {run_dir} ({rc.data.source}) now has {dataset.x_train.shape[0]} "
                         f"examples, but the run was trained on {num_train}; restore the original data or start a "
                         "new run")
    checkpoint_dir = run_dir / CHECKPOINT_DIR
    if not Checkpoints(checkpoint_dir).steps():
        raise FileNotFoundError(f"{run_dir} has no checkpoint to resume from ({checkpoint_dir} is missing or "
                                "empty); start the run again")
    check_writable(run_dir, option="run directory")
    mesh = _mesh(devices, train_cfg.batch_size)

    def after_restore(meta: dict[str, Any]) -> None:
        # The checkpoint is valid: record what changed (epochs, time limit, skipping) in config.json.
        if changes:
            cfg = dict(rc.raw, train=dataclasses.asdict(train_cfg))
            cfg["resumed"] = list(rc.raw.get("resumed", [])) + [
                {"at_step": int(meta["step"]), "changed": changes,
                 "when": _dt.datetime.now().isoformat(timespec="seconds")}]
            tmp = run_dir / (CONFIG_FILE + ".tmp")
            write_json(tmp, cfg)
            os.replace(tmp, run_dir / CONFIG_FILE)
        print(f"{PROG}: resuming {rc.kind.name} run {run_dir} from its checkpoint at step {meta['step']} (epoch "
              f"{meta['epoch']}{', batch ' + str(meta['batch']) if meta.get('batch') else ''}), "
              f"{train_cfg.epochs} epochs in all", flush=True)

    return _train(run_dir, rc.kind, rc.model_config, rc.objective, rc.data, train_cfg, dataset, mesh=mesh,
                  progress=progress, resume=True, after_restore=after_restore)


def _train(run_dir: Path, kind: ModelKind, model_config: Any, objective: Any, spec: DataSpec, train_cfg: TrainConfig,
           dataset: Any, *, mesh: Any, progress: bool, resume: bool = False,
           after_restore: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Train (or go on training) the run in ``run_dir``, then write the figures and summary.json."""
    import jax
    import optax

    from dlvm_jax import train

    likelihood = model_config.likelihood
    model = kind.build(model_config)
    train_loss, test_loss = kind.make_losses(model, objective)
    if train_cfg.microbatch:
        from dlvm_jax.objectives import microbatched

        train_loss = microbatched(train_loss, train_cfg.microbatch)
    start = time.perf_counter()
    k_init, k_train, k_eval, k_fig = jax.random.split(jax.random.key(train_cfg.seed), 4)
    optimizer = optax.adam(train_cfg.lr)
    common = dict(mesh=mesh, checkpoint_dir=run_dir / CHECKPOINT_DIR, checkpoint_every=train_cfg.checkpoint_every,
                  keep_checkpoints=train_cfg.keep_checkpoints, resume=resume,
                  skip_nonfinite=train_cfg.skip_nonfinite, after_restore=after_restore,
                  fingerprint=_fingerprint(kind.name, model_config, objective, spec, train_cfg))
    selection = None
    try:
        if train_cfg.restarts == 1:
            state = train.init_state(kind.init(model, k_init, dataset), optimizer, k_train)
            state, history = train.fit(
                state, dataset.x_train, loss_fn=train_loss, optimizer=optimizer, batch_size=train_cfg.batch_size,
                epochs=train_cfg.epochs, test_data=dataset.x_test, eval_loss_fn=test_loss,
                eval_every=train_cfg.eval_every, metrics_path=run_dir / METRICS_FILE,
                checkpoint_path=run_dir / PARAMS_FILE, time_limit=train_cfg.time_limit, progress=progress,
                eval_key=k_eval,
                # Convolution gradients compile to far slower CPU code inside lax.scan: step them one by one.
                scan=getattr(model_config, "network", "mlp") != "conv", **common)
        else:
            state, history, selection = train.fit_restarts(
                model, dataset.x_train, init_fn=lambda k: kind.init(model, k, dataset), loss_fn=train_loss,
                optimizer=optimizer, key=k_train, restarts=train_cfg.restarts, batch_size=train_cfg.batch_size,
                epochs=train_cfg.epochs, test_data=dataset.x_test, eval_loss_fn=test_loss,
                eval_every=train_cfg.eval_every, metrics_path=run_dir / METRICS_FILE,
                time_limit=train_cfg.time_limit, progress=progress, **common)
            train.save_params(run_dir / PARAMS_FILE, state.params)
            print(f"kept restart {selection['chosen']} of {train_cfg.restarts}, the best training objective ("
                  f"{', '.join(f'{v:.3f}' for v in selection['train_objective'])}; importance-sampled log p(x), "
                  f"K={selection['score_samples']}: {', '.join(f'{v:.3f}' for v in selection['train_log_px'])})")
    except FloatingPointError as err:
        message = str(err).replace("(skip_nonfinite=True, dlvm train --skip-nonfinite)",
                                   f"by resuming with: {PROG} train --resume {run_dir} --skip-nonfinite")
        raise FloatingPointError(message) from None
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

    from dlvm_jax import parallel
    from dlvm_jax.objectives import check_num_samples

    check_num_samples(args.num_samples, "--num-samples")
    check_num_samples(args.chunk_size, "--chunk-size")
    check_num_samples(args.batch_size, "--batch-size")
    if args.max_examples is not None and args.max_examples < 1:
        raise ValueError(f"--max-examples must be >= 1, got {args.max_examples}")
    run = load_run(args.run_dir, data_dir=args.data_dir)
    dataset = load_data(run.data, run.model_config.likelihood)
    check_data_shape(dataset, run.model_config, run.path, run.data)
    mesh = parallel.make_mesh(args.devices)
    x = dataset.x_test if args.max_examples is None else dataset.x_test[: args.max_examples]
    start = time.perf_counter()
    # Each batch is split over the devices (rounded up to a multiple of their number; on one device the same
    # numbers as dlvm_jax.likelihood.log_likelihood).
    est = parallel.log_likelihood(run.model, run.params, x, jax.random.key(args.seed), mesh=mesh,
                                  num_samples=args.num_samples, chunk_size=args.chunk_size,
                                  batch_size=args.batch_size, progress=args.progress)
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


def _option_keys(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The keys an option file may use for ``parser``'s options: long option names (with '_' or '-') and dests."""
    keys: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "config", "resume", "train_parser"):
            continue
        for opt in action.option_strings:
            if opt.startswith("--"):
                keys[opt[2:].replace("-", "_")] = action
        keys.setdefault(action.dest, action)
    return keys


def _option_value(action: argparse.Action, key: str, value: Any, where: str) -> Any:
    """A JSON value checked (and converted) as the command line would check ``--key value``."""

    def bad(expected: str) -> ValueError:
        return ValueError(f"key {key!r} in config file {where} must be {expected}, got {json.dumps(value)}")

    if action.nargs == 0:  # flags such as --skip-nonfinite, --no-progress, --mc-kl
        if not isinstance(value, bool):
            raise bad("true or false")
        if key == action.dest:
            return value
        return action.const if value else action.default
    if value is None:
        if action.default is None:
            return None
        raise bad("a value (null is not allowed here)")
    if action.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif action.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
    elif action.type is parse_int_list:
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            value = ",".join(map(str, value)) if value else "none"
        elif not isinstance(value, str):
            raise bad("a list of integers such as [128, 128]")
        try:
            value = parse_int_list(value)
        except argparse.ArgumentTypeError as err:
            raise ValueError(f"key {key!r} in config file {where}: {err}") from None
    elif action.type is None and not isinstance(value, str):
        raise bad("a string")
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"key {key!r} in config file {where} must be one of {', '.join(map(str, action.choices))}, "
                         f"got {json.dumps(value)}{closest(value, action.choices)}")
    return value


def read_option_file(path: str | os.PathLike, parser: argparse.ArgumentParser, *, model: str | None = None
                     ) -> dict[str, Any]:
    """``{dest: value}`` from a JSON object of option values for ``parser`` (``dlvm train MODEL --config FILE``).

    Keys are the long option names (``batch_size`` or ``batch-size``); values have the option's type (numbers,
    strings, true/false for flags, lists of integers for widths such as ``hidden``). An unknown key (with the
    closest known one suggested), a value of the wrong type or outside the choices is refused in one line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read config file {path}: {err}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"config file {path} must hold a JSON object of option values, such as "
                         '{"epochs": 50, "batch_size": 200}')
    keys = _option_keys(parser)
    values: dict[str, Any] = {}
    for key, value in obj.items():
        if key == "model":
            if model is not None and value != model:
                raise ValueError(f"config file {path} is for model {value!r}, not {model!r}")
            continue
        norm = str(key).lstrip("-").replace("-", "_")
        if norm not in keys:
            raise ValueError(f"unknown key {key!r} in config file {path}{closest(norm, sorted(keys))}")
        action = keys[norm]
        values[action.dest] = _option_value(action, str(key), value, str(path))
    return values


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Deep latent variable models in JAX: train, evaluate, sample.")
    from dlvm_jax import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p_train = sub.add_parser("train", help="train a model and write a run directory",
                             description=f"Train a model ({PROG} train MODEL [options]), or continue a run from its "
                                         f"latest checkpoint ({PROG} train --resume RUN_DIR).")
    g = p_train.add_argument_group("continuing a run (any model)")
    g.add_argument("--resume", dest="top_resume", default=None, metavar="RUN_DIR",
                   help="continue RUN_DIR from its latest checkpoint, with its own config.json")
    g.add_argument("--epochs", dest="top_epochs", type=int, default=None, metavar="N", help="train to this many epochs in all")
    g.add_argument("--time-limit", dest="top_time_limit", type=float, default=None, metavar="SECONDS",
                   help="stop after the first epoch that ends past this many seconds (of this session)")
    g.add_argument("--devices", dest="top_devices", type=int, default=None, metavar="N", help="[all devices]")
    g.add_argument("--data-dir", dest="top_data_dir", default=None, metavar="DIR", help="data folder, if it moved since training")
    g.add_argument("--skip-nonfinite", dest="top_skip_nonfinite", action="store_true",
                   help="from now on skip updates whose loss or gradient is non-finite")
    g.add_argument("--no-progress", dest="top_progress", action="store_false", help="no progress bar")
    p_train.set_defaults(func=cmd_train)
    models = p_train.add_subparsers(dest="model", metavar="MODEL")
    for kind in MODEL_KINDS.values():
        p = models.add_parser(kind.name, help=kind.help, description=f"Train a {kind.help}.")
        add_data_arguments(p, kind.defaults.get("data", "digits"))
        kind.add_arguments(p)
        add_train_arguments(p, kind.defaults)
        p.set_defaults(func=cmd_train, train_parser=p)

    p = sub.add_parser("evaluate", help="importance-sampled test log-likelihood of a run")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--num-samples", "-K", type=int, default=5000, metavar="K", help="importance samples [5000]")
    p.add_argument("--chunk-size", type=int, default=500, help="samples drawn at once per example [500]")
    p.add_argument("--batch-size", type=int, default=100, help="examples per batch [100]")
    p.add_argument("--max-examples", type=int, default=None, metavar="N", help="only the first N test examples")
    p.add_argument("--seed", type=int, default=0, help="[0]")
    p.add_argument("--data-dir", default=None, help="data folder, if it moved since training")
    p.add_argument("--devices", type=int, default=None, metavar="N",
                   help="split each batch over the first N devices [all devices JAX sees]")
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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        if getattr(args, "config", None):
            args.train_parser.set_defaults(**read_option_file(args.config, args.train_parser, model=args.model))
            args = parser.parse_args(argv)  # options on the command line win over the file
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
