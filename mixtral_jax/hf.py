"""Hugging Face Mixtral checkpoints: the tensor layout table, reading a
Hugging Face directory, and streaming conversion in both directions.

A Hugging Face directory (the Hub layout `save_pretrained` writes) holds one
tensor per layer and expert, in torch's Linear layout [out, in]; a mixtral-jax
checkpoint holds one stacked array per parameter ([L, ...] or [L, E, ...]) in
einsum layout. `HFTensor.to_ours` maps a file tensor to its slot in the stacked
leaf as a numpy *view* (transpose + reshape), so one table drives both
directions and a round trip moves bytes without arithmetic. Hub files use the
rotate-half RoPE layout, as our model does: q and k need no permutation.

Memory: conversion never holds the model. Hugging Face -> ours fills
disk-backed `np.memmap` leaves tensor by tensor (in a temporary folder beside
the output, so it needs the model's size twice on disk for a moment) and Orbax
writes them in small OCDBT data files; ours -> Hugging Face writes each
safetensors header first, maps the shard files, and fills them from the stored
arrays one storage chunk at a time (tensorstore reads only that chunk).
"""

from __future__ import annotations

import itertools
import json
import math
import pathlib
import shutil
import struct
import sys
import tempfile
from typing import Callable, NamedTuple

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import nnx, traverse_util
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from mixtral_jax.checkpoint import CHECKPOINTS, PARAMS, param_tree, read_model_config, resolve, write_run_config
from mixtral_jax.config import ConfigError, MixtralConfig
from mixtral_jax.configtools import UserError

HF_CONFIG = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_KEY = "mixtral_jax_tokenizer"  # config.json's name for a tokenizer with no .model file ("bytes")
TOKENIZER_BY_VOCAB = {32768: "mistral-v3"}  # without tokenizer.model; other sizes keep the default
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
# Orbax OCDBT data-file size (which also caps its chunk size) when writing a converted
# checkpoint. Tensorstore buffers whole data files, up to 128 in flight (Orbax's file I/O
# limit): 32 MiB bounds that at 4 GiB; measured on 2 cores, +0.2 GiB whatever the model size.
ORBAX_DATA_FILE_BYTES = 32 * 2**20


class HFTensor(NamedTuple):
    """One tensor of a Hugging Face Mixtral checkpoint and its place in ours."""

    name: str  # e.g. "model.layers.3.block_sparse_moe.experts.5.w1.weight"
    shape: tuple[int, ...]  # its shape in the Hugging Face file
    leaf: tuple[str, ...]  # its parameter in `checkpoint.param_tree`, e.g. ("layers", "moe", "w_gate")
    index: tuple[int, ...]  # its slot in that stacked leaf: (), (layer,) or (layer, expert)
    to_ours: Callable[[np.ndarray], np.ndarray]  # file layout -> our layout, as a view


def hf_tensors(config: MixtralConfig) -> list[HFTensor]:
    """Every tensor of the Hugging Face checkpoint of `config`, in file order."""
    d, v, e, f, h = (config.hidden_size, config.vocab_size, config.num_local_experts,
                     config.intermediate_size, config.head_size)
    n, k = config.num_attention_heads, config.num_key_value_heads

    def same(w):
        return w

    def transpose(w):  # [out, in] -> [in, out]
        return w.T

    def heads(count):  # q/k/v_proj [count*H, D] -> [D, count, H]
        return lambda w: w.reshape(count, h, d).transpose(2, 0, 1)

    def out_heads(w):  # o_proj [D, N*H] -> [N, H, D]
        return w.reshape(d, n, h).transpose(1, 2, 0)

    tensors = [HFTensor("model.embed_tokens.weight", (v, d), ("embed",), (), same)]
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        per_layer = [
            ("input_layernorm.weight", (d,), ("attn_norm", "weight"), same),
            ("self_attn.q_proj.weight", (n * h, d), ("attn", "q"), heads(n)),
            ("self_attn.k_proj.weight", (k * h, d), ("attn", "k"), heads(k)),
            ("self_attn.v_proj.weight", (k * h, d), ("attn", "v"), heads(k)),
            ("self_attn.o_proj.weight", (d, n * h), ("attn", "o"), out_heads),
            ("post_attention_layernorm.weight", (d,), ("moe_norm", "weight"), same),
            ("block_sparse_moe.gate.weight", (e, d), ("moe", "router"), transpose),
        ]
        tensors += [HFTensor(p + name, shape, ("layers", *leaf), (layer,), fn)
                    for name, shape, leaf, fn in per_layer]
        for expert in range(e):
            ex = f"{p}block_sparse_moe.experts.{expert}."
            tensors += [HFTensor(ex + "w1.weight", (f, d), ("layers", "moe", "w_gate"), (layer, expert), transpose),
                        HFTensor(ex + "w2.weight", (d, f), ("layers", "moe", "w_down"), (layer, expert), transpose),
                        HFTensor(ex + "w3.weight", (f, d), ("layers", "moe", "w_up"), (layer, expert), transpose)]
    tensors += [HFTensor("model.norm.weight", (d,), ("norm", "weight"), (), same),
                HFTensor("lm_head.weight", (v, d), ("lm_head",), (), transpose)]
    return tensors


def _leaf_shapes(config: MixtralConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Shape of every parameter of the model `config` builds, by path (no memory used)."""
    from mixtral_jax.model import Mixtral

    abstract = nnx.eval_shape(lambda: Mixtral(config, rngs=nnx.Rngs(0)))
    return {path: x.shape for path, x in traverse_util.flatten_dict(param_tree(abstract)).items()}


# ---- reading a Hugging Face directory ---------------------------------------------------------
def read_hf_config(directory: str | pathlib.Path) -> MixtralConfig:
    """The model config of a Hugging Face Mixtral directory (its config.json), naming the
    directory's tokenizer: its tokenizer.model, else the one config.json names
    (`convert_to_hf` names "bytes"), else Mixtral's of the model's vocabulary size."""
    directory = pathlib.Path(directory)
    path = directory / HF_CONFIG
    if not directory.is_dir():
        raise UserError(f"{directory}: no such directory")
    if not path.is_file():
        raise UserError(f"{directory}: no {HF_CONFIG}; not a Hugging Face model directory")
    try:
        hf_config = json.loads(path.read_text())
        config = MixtralConfig.from_hf_config(hf_config)
        if (directory / TOKENIZER_FILE).is_file():
            return config.replace(tokenizer=str((directory / TOKENIZER_FILE).absolute()))
        return config.replace(tokenizer=hf_config.get(TOKENIZER_KEY)
                              or TOKENIZER_BY_VOCAB.get(config.vocab_size, config.tokenizer))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    except (ConfigError, TypeError) as err:
        raise UserError(f"{path}: {err}") from None


def _weight_files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
    """Tensor name -> the safetensors file holding it (from the index, or the single file)."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{index}: not a safetensors index (no weight_map)") from None
        files = {name: directory / file for name, file in weight_map.items()}
        absent = sorted({p.name for p in files.values() if not p.is_file()})
        if absent:
            raise UserError(f"{index}: lists {absent[0]}, which is not in {directory}")
        return files
    single = directory / SINGLE_FILE
    if not single.is_file():
        raise UserError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    with _open_safetensors(single) as f:
        return dict.fromkeys(f.keys(), single)


def _open_safetensors(path: pathlib.Path):
    try:
        return safe_open(path, "np")
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None


def _check_tensors(directory: str | pathlib.Path, config: MixtralConfig
                   ) -> tuple[dict[pathlib.Path, list[HFTensor]], str]:
    """Checks that every tensor `config` needs is present with its shape (reading headers only).

    Returns the tensors grouped by file and the checkpoint's dtype name (that of
    its embedding). Raises UserError naming the first missing or misshapen tensor.
    """
    directory = pathlib.Path(directory)
    files = _weight_files(directory)
    tensors = hf_tensors(config)
    missing = [t.name for t in tensors if t.name not in files]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{directory}: tensor {missing[0]} is missing{more}")
    by_file: dict[pathlib.Path, list[HFTensor]] = {}
    for t in tensors:
        by_file.setdefault(files[t.name], []).append(t)
    for path, group in by_file.items():
        with _open_safetensors(path) as f:
            present = set(f.keys())
            for t in group:
                if t.name not in present:
                    raise UserError(f"{path.name}: tensor {t.name} is missing (the index says it is here)")
                piece = f.get_slice(t.name)
                shape, dtype = tuple(piece.get_shape()), piece.get_dtype()
                if shape != t.shape:
                    raise UserError(f"{path.name}: tensor {t.name} has shape {list(shape)}, but "
                                    f"{HF_CONFIG} implies {list(t.shape)}")
                if dtype not in SAFETENSORS_DTYPES:
                    raise UserError(f"{path.name}: tensor {t.name} has dtype {dtype}; expected one of "
                                    f"{', '.join(SAFETENSORS_DTYPES)}")
                if t.leaf == ("embed",):
                    checkpoint_dtype = SAFETENSORS_DTYPES[dtype]
    return by_file, checkpoint_dtype


def _fill(by_file: dict[pathlib.Path, list[HFTensor]], leaves: dict[tuple[str, ...], np.ndarray],
          progress: bool) -> None:
    """Copies every file tensor into its slot of `leaves` (flat path -> stacked array), one at a time."""
    with tqdm(total=sum(map(len, by_file.values())), desc="reading safetensors", unit="tensor",
              disable=not progress) as bar:
        for path, group in by_file.items():
            with safe_open(path, "np") as f:
                for t in group:
                    leaf = leaves[t.leaf]
                    leaf[t.index] = t.to_ours(f.get_tensor(t.name)).astype(leaf.dtype, copy=False)
                    bar.update()


def read_hf_params(directory: str | pathlib.Path, config: MixtralConfig,
                   progress: bool = False) -> dict:
    """The parameters of a Hugging Face directory as a `param_tree`-shaped dict of numpy
    arrays in `config.param_dtype` (held in memory: for `load`, not for conversion)."""
    by_file, _ = _check_tensors(directory, config)
    dtype = jnp.dtype(config.param_dtype)
    leaves = {path: np.empty(shape, dtype) for path, shape in _leaf_shapes(config).items()}
    _fill(by_file, leaves, progress)
    return traverse_util.unflatten_dict(leaves)


# ---- Hugging Face -> mixtral-jax ----------------------------------------------------------------
def convert_from_hf(directory: str | pathlib.Path, out: str | pathlib.Path,
                    progress: bool = True) -> pathlib.Path:
    """Writes the Hugging Face Mixtral checkpoint in `directory` as the mixtral-jax run
    directory `out` (config.yaml + checkpoints/0/params), keeping its dtype; returns the step folder.

    A tokenizer.model beside the weights is copied into `out` and named in config.yaml.
    """
    directory, out = pathlib.Path(directory), pathlib.Path(out).absolute()
    config = read_hf_config(directory)
    by_file, dtype = _check_tensors(directory, config)
    config = config.replace(param_dtype=dtype)
    if (out / CHECKPOINTS).exists():
        raise UserError(f"{out} already holds {CHECKPOINTS}/; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.convert-") as tmp:
        leaves = {path: np.memmap(pathlib.Path(tmp) / ".".join(path), jnp.dtype(dtype), "w+", shape=shape)
                  for path, shape in _leaf_shapes(config).items()}
        _fill(by_file, leaves, progress)
        if progress:
            print("writing the Orbax checkpoint ...", file=sys.stderr)
        _save_params(out, traverse_util.unflatten_dict(leaves))
    if (directory / TOKENIZER_FILE).is_file():
        shutil.copyfile(directory / TOKENIZER_FILE, out / TOKENIZER_FILE)
        config = config.replace(tokenizer=str(out / TOKENIZER_FILE))
    elif TOKENIZER_KEY not in json.loads((directory / HF_CONFIG).read_text()):
        print(f"note: no {TOKENIZER_FILE} in {directory}; the checkpoint names the tokenizer "
              f"{config.tokenizer!r} (vocab_size {config.vocab_size}); train with data.tokenizer=... to use "
              f"another", file=sys.stderr)
    write_run_config(out, {"model": config})
    return out / CHECKPOINTS / "0"


def _save_params(run_dir: pathlib.Path, params: dict) -> None:
    """Saves numpy (memmap) params as step 0 in the layout `checkpoint.restore_params` reads.

    The numpy handler is told not to deep-copy its arrays (a memmap would be
    read whole into memory), and small OCDBT data files keep tensorstore's
    in-flight buffers small.
    """
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(run_dir / CHECKPOINTS, options=options,
                               item_handlers={PARAMS: handler}) as manager:
        manager.save(0, args=ocp.args.Composite(**{PARAMS: ocp.args.PyTreeSave(
            params, ocdbt_target_data_file_size=ORBAX_DATA_FILE_BYTES)}))


# ---- mixtral-jax -> Hugging Face ----------------------------------------------------------------
def convert_to_hf(checkpoint: str | pathlib.Path, directory: str | pathlib.Path,
                  max_shard_bytes: int = 5 * 10**9, progress: bool = True) -> list[pathlib.Path]:
    """Writes a mixtral-jax checkpoint as a Hugging Face Mixtral directory that
    `MixtralForCausalLM.from_pretrained` loads: safetensors shards of at most
    `max_shard_bytes` (with model.safetensors.index.json when there are several),
    config.json and tokenizer.model. Keeps the stored dtype. Returns the files written."""
    run_dir, step_dir = resolve(checkpoint)
    config = read_model_config(run_dir)
    directory = pathlib.Path(directory)
    if (directory / HF_CONFIG).exists() or any(directory.glob("*.safetensors")):
        raise UserError(f"{directory} already holds a model; choose a new --to-hf directory")
    stores = _open_stored(step_dir.absolute() / PARAMS, _leaf_shapes(config))
    dtypes = {path: np.dtype(store.dtype.numpy_dtype) for path, store in stores.items()}
    tensors = hf_tensors(config)
    shards = _plan_shards(tensors, dtypes, max_shard_bytes)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    directory.mkdir(parents=True, exist_ok=True)
    maps, views = [], {}
    for name, shard in zip(names, shards):
        data, shard_views = _create_safetensors(directory / name, [(t.name, t.shape, dtypes[t.leaf]) for t in shard])
        maps.append(data)
        views.update(shard_views)
    _copy_stored_chunks(stores, tensors, views, progress)
    for data in maps:
        data.flush()

    written = [directory / name for name in names]
    if len(shards) > 1:
        weight_map = {t.name: name for name, shard in zip(names, shards) for t in shard}
        total = sum(math.prod(t.shape) * dtypes[t.leaf].itemsize for t in tensors)
        written.append(directory / INDEX_FILE)
        written[-1].write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf_config = config.replace(param_dtype=dtypes[("embed",)].name).to_hf_config()
    tokenizer = _tokenizer_file(config)
    if tokenizer is not None:
        written.append(directory / TOKENIZER_FILE)
        shutil.copyfile(tokenizer, written[-1])
    elif config.tokenizer == "bytes":  # no file to copy: named for `convert_from_hf`
        hf_config[TOKENIZER_KEY] = config.tokenizer
    written.append(directory / HF_CONFIG)
    written[-1].write_text(json.dumps(hf_config, indent=2))
    return written


def _copy_stored_chunks(stores: dict[tuple[str, ...], ts.TensorStore], tensors: list[HFTensor],
                        views: dict[str, np.ndarray], progress: bool) -> None:
    """Reads each stored leaf one storage chunk at a time and writes every file tensor's part of it."""
    by_leaf: dict[tuple[str, ...], list[HFTensor]] = {}
    for t in tensors:
        by_leaf.setdefault(t.leaf, []).append(t)
    blocks = [(path, block) for path, store in stores.items() for block in _storage_blocks(store)]
    for path, block in tqdm(blocks, desc="writing safetensors", unit="chunk", disable=not progress):
        data = stores[path][block].read().result()
        for t in by_leaf[path]:
            slot = block[:len(t.index)]  # the chunk's range of layers (and experts)
            if all(s.start <= i < s.stop for i, s in zip(t.index, slot)):
                local = tuple(i - s.start for i, s in zip(t.index, slot))
                t.to_ours(views[t.name])[block[len(t.index):]] = data[local]


def _open_stored(params_dir: pathlib.Path, shapes: dict[tuple[str, ...], tuple[int, ...]]
                 ) -> dict[tuple[str, ...], ts.TensorStore]:
    """Opens every stored parameter as a tensorstore array (nothing is read yet)."""
    metadata = json.loads((params_dir / "_METADATA").read_text())  # Orbax's tree metadata
    use_ocdbt = metadata.get("use_ocdbt", True)
    context = ocp.type_handlers.get_ts_context(use_ocdbt=use_ocdbt)
    stores = {}
    for path, shape in shapes.items():
        name = ".".join(path)
        info = ocp.type_handlers.ParamInfo(name=name, parent_dir=epath.Path(params_dir),
                                           is_ocdbt_checkpoint=use_ocdbt,
                                           use_zarr3=metadata.get("use_zarr3", False), ts_context=context)
        spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
        try:
            store = ts.open(spec, context=context).result()
        except ValueError:
            raise UserError(f"{params_dir}: parameter {name} is missing") from None
        if tuple(store.shape) != shape:
            raise UserError(f"{params_dir}: parameter {name} has shape {list(store.shape)}, but "
                            f"the model config implies {list(shape)}")
        stores[path] = store
    return stores


def _storage_blocks(store: ts.TensorStore) -> list[tuple[slice, ...]]:
    """The array's storage chunks as index tuples: reading one decodes one chunk."""
    chunk = store.chunk_layout.read_chunk.shape or store.shape
    ranges = [[slice(start, min(start + (c or n), n)) for start in range(0, n, c or n)]
              for n, c in zip(store.shape, chunk)]
    return list(itertools.product(*ranges))


def _plan_shards(tensors: list[HFTensor], dtypes: dict, max_bytes: int) -> list[list[HFTensor]]:
    """Splits the tensors, in order, into shards of at most `max_bytes` (a bigger tensor gets its own)."""
    shards: list[list[HFTensor]] = [[]]
    size = 0
    for t in tensors:
        nbytes = math.prod(t.shape) * dtypes[t.leaf].itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def _create_safetensors(path: pathlib.Path, entries: list[tuple[str, tuple[int, ...], np.dtype]]
                        ) -> tuple[np.memmap, dict[str, np.ndarray]]:
    """Writes a safetensors header for `entries` and maps the file's (zeroed) data region.

    Returns the map and a writable view of each tensor: the data is filled in
    later, in whatever order the stored chunks come, without holding the shard.
    """
    header: dict = {"__metadata__": {"format": "pt"}}
    end = 0
    for name, shape, dtype in entries:
        start, end = end, end + math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _safetensors_dtype(dtype), "shape": list(shape), "data_offsets": [start, end]}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data region starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + end)
    data = np.memmap(path, np.uint8, "r+", offset=8 + len(text), shape=(end,))
    views = {name: data[slice(*header[name]["data_offsets"])].view(dtype).reshape(shape)
             for name, shape, dtype in entries}
    return data, views


def _safetensors_dtype(dtype: np.dtype) -> str:
    names = {ours: code for code, ours in SAFETENSORS_DTYPES.items()}
    if dtype.name not in names:
        raise UserError(f"parameters of dtype {dtype.name} cannot be exported (supported: {', '.join(names)})")
    return names[dtype.name]


def _tokenizer_file(config: MixtralConfig) -> pathlib.Path | None:
    """The .model file of the config's tokenizer, or None (with a note) if it has none
    or the tokenizer does not fit the model's vocabulary."""
    from mixtral_jax.tokenizer import Tokenizer

    if config.tokenizer == "bytes":  # the byte tokenizer is code, not a file
        return None
    try:
        return Tokenizer.for_config(config).path
    except UserError as err:
        print(f"note: no {TOKENIZER_FILE} written ({err})", file=sys.stderr)
        return None
