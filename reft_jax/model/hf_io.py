"""transformers checkpoint directories: `config.json` + `*.safetensors` in, and out.

Reading is lazy (`safe_open(...).get_slice`): `place_params` asks for one shard of one tensor
at a time, so a device (and, on a pod, a host) only reads the bytes it will hold.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

import numpy as np
from safetensors import safe_open

from reft_jax.model.config import ModelConfig
from reft_jax.model.hf_layout import ModelLoadError

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsSource:
    """HF-named tensors of a (possibly sharded) safetensors checkpoint, read slice by slice."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = pathlib.Path(directory)
        self.path = str(self.dir)
        self._file_of = _tensor_files(self.dir)
        self._handles: dict[str, Any] = {}
        self._shapes = {}
        for name, file in self._file_of.items():
            self._shapes[name] = tuple(self._handle(file).get_slice(name).get_shape())

    def _handle(self, file: str):
        if file not in self._handles:
            path = self.dir / file
            try:
                self._handles[file] = safe_open(str(path), framework="numpy")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise ModelLoadError(f"{path}: cannot read safetensors file: {e}") from e
        return self._handles[file]

    def names(self) -> set[str]:
        return set(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def where(self, name: str) -> str:
        return str(self.dir / self._file_of[name])

    def read(self, name: str, rows: slice, cols: slice | None) -> np.ndarray:
        sl = self._handle(self._file_of[name]).get_slice(name)
        return sl[rows] if cols is None else sl[rows, cols]


def _tensor_files(directory: pathlib.Path) -> dict[str, str]:
    """tensor name -> file name, from the index when the checkpoint is sharded."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({e})") from e
        for file in sorted(set(weight_map.values())):
            if not (directory / file).is_file():
                raise ModelLoadError(f"{index}: lists {file}, which does not exist in {directory}")
        return dict(weight_map)
    files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in directory.glob("*.bin"))
        hint = f" (found {bins[0]}: PyTorch pickles are not read; re-save with safe_serialization)" if bins else ""
        raise ModelLoadError(f"{directory}: no *.safetensors weights{hint}")
    if SINGLE_FILE in files:
        files = [SINGLE_FILE]
    out: dict[str, str] = {}
    for file in files:
        with safe_open(str(directory / file), framework="numpy") as f:
            for name in f.keys():
                out[name] = file
    return out


def read_hf_config(directory: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """`ModelConfig` from `config.json`, refusing what our model would compute differently."""
    path = pathlib.Path(directory) / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing (an HF model directory needs config.json)")
    try:
        hf = json.loads(path.read_text())
    except ValueError as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from e
    check_hf_config(hf, str(path))
    try:
        return ModelConfig.from_hf(hf, **overrides)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: {e}") from e


def check_hf_config(hf: dict[str, Any], where: str) -> None:
    """Features of an HF config that our decoder does not implement: refuse, don't approximate.

    Sliding-window attention only changes results for sequences longer than the window, so a
    window that is absent or at least the context length is ignored; a shorter one is refused.
    """
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"{where}: hidden_act={act!r} is not supported (only silu)")
    context = int(hf.get("max_position_embeddings", 2048))
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", True)  # Qwen2 has a switch; Mistral does not
    if window is not None and uses_window and int(window) < context:
        raise ModelLoadError(
            f"{where}: sliding_window={window} < max_position_embeddings={context}: sliding-window "
            f"attention is not implemented. If you only use sequences of at most {window} tokens, "
            f"set sliding_window to null in config.json (results are then exact)"
        )
    for key in ("rope_scaling", "rope_parameters"):
        spec = hf.get(key) or {}
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind == "dynamic":
            raise ModelLoadError(
                f"{where}: rope type 'dynamic' (dynamic NTK) is not supported: its frequencies "
                f"depend on the running sequence length; supported: default, linear, llama3, yarn"
            )


def write_hf_dir(directory: str | os.PathLike, config: ModelConfig, tensors: dict[str, np.ndarray],
                 special_ids: dict[str, int | None], max_shard_bytes: int = 4 << 30) -> None:
    """config.json, generation_config.json and (sharded when large) safetensors files."""
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    hf = config.to_hf()
    hf.update({k: v for k, v in special_ids.items() if v is not None})
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    gen = {k: v for k, v in special_ids.items() if v is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors, key=_natural):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    for stale in out.glob("*.safetensors"):
        stale.unlink()
    if len(shards) == 1:
        _save(shards[0], out / SINGLE_FILE)
        (out / INDEX_FILE).unlink(missing_ok=True)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _save(shard, out / file)
        weight_map.update({name: file for name in shard})
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _save(tensors: dict[str, np.ndarray], path: pathlib.Path) -> None:
    """safetensors writes 0600 files; give them the usual umask permissions like the rest."""
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    path.chmod(0o666 & ~_umask())


def _umask() -> int:
    """The process umask, read without os.umask's set-and-restore race (Linux), else 022."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _natural(name: str) -> tuple:
    """Sort `layers.10` after `layers.9`, so shards hold consecutive layers."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))
