"""Training checkpoints with orbax: every array of the training state, and a JSON record of where training stood.

A checkpoint is one step folder of an ``orbax.checkpoint.CheckpointManager`` directory, written synchronously and
atomically (orbax writes a temporary folder and renames it when complete, so a killed process leaves either the
whole checkpoint or none); the last ``max_to_keep`` are kept. It holds two items:

* ``state``: the leaves of any pytree of arrays (parameters, optimizer state, PRNG keys as their raw key data, the
  step counter), stored under the names ``leaf_00000``, ``leaf_00001`` ...;
* ``meta``: JSON: the epoch, the position in the epoch, the training history, the size of the metrics log at
  that moment, a fingerprint of the configuration, and for each leaf its path, shape, dtype, PRNG implementation
  and a SHA-256 digest of its bytes.

Once orbax has finished a checkpoint, ``dlvm_files.json`` in its folder records the size and SHA-256 of each of
its files. Restoring checks, before orbax reads anything, that every file is there, whole and unchanged (a
truncated or corrupted checkpoint is refused in one line, naming the file), and that the leaves' paths, shapes
and dtypes are those of the template the caller gives (a checkpoint of another model is refused in one line
naming the first difference); after reading, that every leaf's digest matches. Nothing is pickled: arrays go
through tensorstore, the rest through JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

FORMAT = 1
#: Sizes and SHA-256 digests of a checkpoint's files, written into its folder once orbax has finished it.
MANIFEST = "dlvm_files.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, corrupted, or written for another model or configuration."""


def leaf_name(path: tuple[Any, ...]) -> str:
    """``('params', 'encoder', 'Dense_0', 'kernel')`` style path of a pytree leaf, joined with '/'."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def host_array(x: Any) -> np.ndarray:
    """The bytes of a leaf on this host (a replicated array's local copy when it spans several processes)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(jax.device_get(x))


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:32]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:32]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


def describe_leaves(tree: Any) -> list[dict[str, Any]]:
    """Path, shape, dtype (and PRNG implementation) of every leaf of ``tree``."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if _is_key(leaf):
            raw = jax.random.key_data(leaf)
            out.append({"path": leaf_name(path), "shape": list(raw.shape), "dtype": str(raw.dtype),
                        "key_impl": str(jax.random.key_impl(leaf))})
        else:
            dtype = np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
            out.append({"path": leaf_name(path), "shape": list(np.shape(leaf)), "dtype": str(dtype)})
    return out


class Checkpoints:
    """The checkpoints of one training run, in ``directory`` (created on the first save)."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3) -> None:
        if int(max_to_keep) != max_to_keep or max_to_keep < 1:
            raise ValueError(f"the number of checkpoints to keep must be an integer >= 1, got {max_to_keep}")
        self.directory = Path(directory).absolute()
        self.max_to_keep = int(max_to_keep)
        self._manager: ocp.CheckpointManager | None = None
        self._writable = False

    # -- the orbax manager, made when first needed (reading never creates the folder) -------------------------

    def _mngr(self, *, create: bool) -> ocp.CheckpointManager | None:
        if self._manager is not None and create and not self._writable:
            self.close()  # opened for reading: reopen for writing (which also clears a killed save's leftovers)
        if self._manager is None:
            if not create and not self.directory.is_dir():
                return None
            # Synchronous saves; temporary folders of a save that a killed process left behind are removed.
            options = ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep, create=create,
                                                   enable_async_checkpointing=False,
                                                   cleanup_tmp_directories=create)
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
            self._writable = create
        return self._manager

    def steps(self) -> list[int]:
        """The complete checkpoints' steps, oldest first (unfinished temporary folders are not listed)."""
        mngr = self._mngr(create=False)
        if mngr is None:
            return []
        mngr.reload()
        return sorted(int(s) for s in mngr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None

    # -- writing -----------------------------------------------------------------------------------------------

    def save(self, step: int, tree: Any, meta: dict[str, Any]) -> bool:
        """Write ``tree`` (a pytree of arrays) and the JSON record ``meta`` as the checkpoint of ``step``; returns
        False (and writes nothing) if that step is already saved."""
        mngr = self._mngr(create=True)
        assert mngr is not None
        if step in mngr.all_steps():
            return False
        leaves = jax.tree.leaves(tree)
        arrays = {f"leaf_{i:05d}": (jax.random.key_data(a) if _is_key(a) else a) for i, a in enumerate(leaves)}
        described = describe_leaves(tree)
        for d, a in zip(described, arrays.values()):
            d["sha256"] = _digest(host_array(a))
        record = dict(meta, format=FORMAT, step=int(step), leaves=described)
        mngr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                                     meta=ocp.args.JsonSave(record)), force=True)
        mngr.wait_until_finished()
        if jax.process_index() == 0:
            self._write_manifest(int(step))
        return True

    def _write_manifest(self, step: int) -> None:
        """Size and SHA-256 of every file of a finished checkpoint, in ``MANIFEST`` (written atomically), so
        that damage anywhere is found before orbax reads a byte. A checkpoint whose process was killed before
        this file was written is still used; its arrays are then checked by their digests alone."""
        folder = self.directory / str(step)
        files = {str(p.relative_to(folder)): [p.stat().st_size, _file_digest(p)]
                 for p in sorted(folder.rglob("*")) if p.is_file()}
        tmp = folder / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps({"format": FORMAT, "files": files}), encoding="utf-8")
        os.replace(tmp, folder / MANIFEST)

    def verify_files(self, step: int) -> None:
        """Refuse (one line) a checkpoint whose files differ from what was written: missing, cut short, changed."""
        folder = self.directory / str(step)
        manifest = folder / MANIFEST
        if not manifest.is_file():
            return
        try:
            files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"checkpoint {folder} is truncated or corrupted: its {MANIFEST} cannot be read "
                                  f"({_first_line(err)}); {self._older(step)}") from None
        for name, (size, digest) in files.items():
            path = folder / name
            if not path.is_file():
                problem = "is missing"
            elif path.stat().st_size != size:
                problem = f"has {path.stat().st_size} bytes where {size} were written"
            elif _file_digest(path) != digest:
                problem = "does not match its recorded SHA-256"
            else:
                continue
            raise CheckpointError(f"checkpoint {folder} is truncated or corrupted: file {name!r} {problem}; "
                                  f"{self._older(step)}")

    # -- reading -----------------------------------------------------------------------------------------------

    def _where(self, step: int) -> str:
        return str(self.directory / str(step))

    def _older(self, step: int) -> str:
        older = [s for s in self.steps() if s < step]
        return (f"delete that folder to resume from step {older[-1]}" if older else
                "no earlier checkpoint is left: start the run again")

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON record of checkpoint ``step`` (default: the latest)."""
        step = self._resolve(step)
        self.verify_files(step)
        mngr = self._mngr(create=False)
        assert mngr is not None
        try:
            meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as err:  # orbax / json / file-system errors: one line
            raise CheckpointError(f"checkpoint {self._where(step)} cannot be read, it is truncated or corrupted "
                                  f"({_first_line(err)}); {self._older(step)}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or "leaves" not in meta:
            raise CheckpointError(f"checkpoint {self._where(step)} is not a dlvm checkpoint (format "
                                  f"{meta.get('format') if isinstance(meta, dict) else None!r}); {self._older(step)}")
        return meta

    def _resolve(self, step: int | None) -> int:
        steps = self.steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint to resume from in {self.directory}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory} (there are: "
                                    f"{', '.join(map(str, steps))})")
        return int(step)

    def check_compatible(self, template: Any, meta: dict[str, Any]) -> None:
        """Refuse (one line) a checkpoint whose leaves differ from ``template``'s in path, shape or dtype."""
        saved = meta["leaves"]
        wanted = describe_leaves(template)
        where = self._where(int(meta["step"]))
        if len(saved) != len(wanted):
            raise CheckpointError(f"checkpoint {where} belongs to another model or configuration: it holds "
                                  f"{len(saved)} arrays, this run has {len(wanted)}")
        for s, w in zip(saved, wanted):
            for field in ("path", "shape", "dtype"):
                if s[field] != w[field]:
                    theirs = f" ({w['path']!r})" if field != "path" and s["path"] != w["path"] else ""
                    raise CheckpointError(
                        f"checkpoint {where} belongs to another model or configuration: array {s['path']!r} has "
                        f"{field} {s[field]} there, {w[field]} in this run{theirs}")

    def restore(self, template: Any, step: int | None = None, *, meta: dict[str, Any] | None = None
                ) -> tuple[Any, dict[str, Any]]:
        """``(tree, meta)``: checkpoint ``step`` (default: the latest) read into the structure of ``template``
        (a pytree of arrays, whose shardings the restored arrays take)."""
        step = self._resolve(step if meta is None else int(meta["step"]))
        if meta is None:
            meta = self.read_meta(step)  # checks the files too
        else:
            self.verify_files(step)
        self.check_compatible(template, meta)
        leaves, treedef = jax.tree.flatten(template)
        abstract = {}
        for i, leaf in enumerate(leaves):
            d = meta["leaves"][i]
            sharding = leaf.sharding if isinstance(leaf, jax.Array) else None
            abstract[f"leaf_{i:05d}"] = jax.ShapeDtypeStruct(tuple(d["shape"]), np.dtype(d["dtype"]), sharding=sharding)
        mngr = self._mngr(create=False)
        assert mngr is not None
        try:
            arrays = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state
        except Exception as err:  # tensorstore / orbax errors on damaged files: one line
            raise CheckpointError(f"checkpoint {self._where(step)} cannot be read, it is truncated or corrupted "
                                  f"({_first_line(err)}); {self._older(step)}") from None
        out = []
        for i, leaf in enumerate(leaves):
            d = meta["leaves"][i]
            a = arrays[f"leaf_{i:05d}"]
            if _digest(host_array(a)) != d.get("sha256"):
                raise CheckpointError(f"checkpoint {self._where(step)} is corrupted: array {d['path']!r} does not "
                                      f"match its recorded SHA-256; {self._older(step)}")
            out.append(jax.random.wrap_key_data(a, impl=d["key_impl"]) if "key_impl" in d else a)
        return jax.tree.unflatten(treedef, out), meta
