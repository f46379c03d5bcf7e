"""GPT train/valid/test datasets through megatron-core's BlendedMegatronDatasetBuilder.

Each sample is `seq_length + 1` consecutive tokens drawn across document boundaries
(documents are joined by their eod), shuffled with `seed`; `tokens`/`labels` are the
first/last `seq_length` of them. A blend mixes several indexed datasets by weight and a
split string such as "969,30,1" carves train/valid/test out of each.

megatron-core builds its sample indices with a C++ extension,
`megatron.core.datasets.helpers_cpp`. Binary wheels ship it prebuilt; when it is missing
(a source install) `ensure_helpers()` compiles `helpers.cpp` once with the system C++
compiler and pybind11 into megaseg's cache directory ($MEGASEG_CACHE, default
~/.cache/megaseg) and loads it from there.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

_HELPERS = "megatron.core.datasets.helpers_cpp"


class GPTDatasets(NamedTuple):
    train: object
    valid: object
    test: object


def cache_dir() -> Path:
    return Path(os.environ.get("MEGASEG_CACHE", Path.home() / ".cache" / "megaseg"))


def _compile_helpers(target: Path) -> None:
    import megatron.core.datasets as datasets_pkg

    source = Path(datasets_pkg.__file__).parent / "helpers.cpp"
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError(
            f"{_HELPERS} is missing and no C++ compiler was found to build it (set CXX or install g++)"
        )
    try:
        import pybind11
    except ImportError:
        raise RuntimeError(f"{_HELPERS} is missing; building it needs pybind11 (pip install pybind11)") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    command = [
        compiler, "-O3", "-shared", "-std=c++17", "-fPIC",
        f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
        str(source), "-o", str(partial),
    ]  # fmt: skip
    built = subprocess.run(command, capture_output=True, text=True)
    if built.returncode != 0:
        raise RuntimeError(f"building {_HELPERS} failed: {built.stderr.strip().splitlines()[-1:]}")
    os.replace(partial, target)


def ensure_helpers() -> None:
    """Make `megatron.core.datasets.helpers_cpp` importable, building it if it is missing."""
    try:
        importlib.import_module(_HELPERS)
        return
    except ImportError:
        pass
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    target = cache_dir() / "megatron_helpers" / f"helpers_cpp{suffix}"
    if not target.exists():
        _compile_helpers(target)
    spec = importlib.util.spec_from_file_location(_HELPERS, target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[_HELPERS] = module


def parse_blend(data: str | Sequence[str]) -> tuple[list[str], list[float] | None]:
    """A data prefix, a list of prefixes, or Megatron's flat "w1 p1 w2 p2" weighted list."""
    items = data.split() if isinstance(data, str) else [str(item) for item in data]
    if not items:
        raise ValueError("no data prefix given")
    try:
        float(items[0])
        weighted = True
    except ValueError:
        weighted = False
    if not weighted:
        return items, None
    if len(items) % 2:
        raise ValueError(f"a weighted blend alternates weight and prefix; got {len(items)} items")
    weights, prefixes = items[0::2], items[1::2]
    try:
        parsed = [float(w) for w in weights]
    except ValueError as exc:
        raise ValueError(f"bad blend weight: {exc}") from None
    if any(w < 0 for w in parsed) or sum(parsed) <= 0:
        raise ValueError(f"blend weights must be >= 0 with a positive sum, got {parsed}")
    return prefixes, parsed


def _check_prefixes(prefixes: Sequence[str]) -> None:
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                raise FileNotFoundError(f"indexed dataset file not found: {prefix}{suffix}")


_SPLIT_NAMES = ("train", "valid", "test")


def drop_stale_index_caches(prefixes: Sequence[str], path_to_cache: str | Path | None = None) -> list[Path]:
    """Delete megatron-core's cached sample indices of ``prefixes`` that are older than the
    dataset files they were built from, and return what was deleted.

    megatron-core keys its index cache (``<prefix>/cache/GPTDataset_indices`` by default, or
    ``path_to_cache``) by the data path and the sampling settings, not by the data: a prefix
    rewritten with other documents would silently be read through the old indices (the old
    document count, order and lengths). Call it on one rank before the build.
    """
    import json

    dirs = {Path(path_to_cache)} if path_to_cache else {Path(p) / "cache" / "GPTDataset_indices" for p in prefixes}
    wanted = {os.path.normpath(p) for p in prefixes}
    dropped = []
    for directory in sorted(dirs):
        for description in sorted(directory.glob("*-description.txt")):
            try:
                dataset_path = os.path.normpath(json.loads(description.read_text())["dataset_path"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if dataset_path not in wanted:
                continue
            data_files = [Path(dataset_path + ext) for ext in (".bin", ".idx")]
            written = max((f.stat().st_mtime_ns for f in data_files if f.exists()), default=0)
            base = description.name[: -len("description.txt")]
            cached = [description, *(directory / f"{base}{kind}_index.npy" for kind in ("document", "sample", "shuffle"))]
            if min(f.stat().st_mtime_ns for f in cached if f.exists()) < written:
                for f in cached:
                    f.unlink(missing_ok=True)
                dropped.append(description)
    return dropped


def _suggest_split(documents: int, wanted: Sequence[bool]) -> str | None:
    """A split string giving each wanted split at least one of ``documents`` (train the rest)."""
    others = sum(wanted[1:])
    if documents < 1 + others:
        return None
    return ",".join([str(documents - others)] + ["1" if w else "0" for w in wanted[1:]])


def _check_splits(prefixes: Sequence[str], split: str, num_samples: Sequence[int | None]) -> list[int]:
    """Refuse a split that leaves a split samples are requested from without documents.

    megatron-core carves splits by whole documents, and a GPTDataset with no documents
    either fails deep inside megatron or loops forever looking for enough epochs to fill
    even zero samples. Returns the splits with a positive share that some dataset leaves
    empty while no samples are requested from them: the caller builds those as None.
    """
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    except (AssertionError, ValueError) as exc:
        raise ValueError(
            f"split={split!r} is invalid: give three comma-separated weights such as 98,2,0 ({exc})"
        ) from None
    counts = {}
    for prefix in prefixes:
        indexed = IndexedDataset(prefix)
        counts[prefix] = len(indexed.document_indices) - 1
        del indexed  # closes its mmap
    wanted = [bounds is not None and samples != 0 for bounds, samples in zip(matrix, num_samples)]
    dropped = []
    for prefix, documents in counts.items():
        for i, (name, bounds) in enumerate(zip(_SPLIT_NAMES, matrix)):
            if bounds is None or round(bounds[0] * documents) != round(bounds[1] * documents):
                continue
            if not wanted[i]:
                if i not in dropped:
                    dropped.append(i)
                continue
            suggestion = _suggest_split(min(counts.values()), [True] + wanted[1:])
            fixes = []
            if suggestion and any(wanted[1:]):
                fixes.append(f"--split {suggestion} (at least one document per split)")
            if not wanted[2]:
                fixes.append("--split 100,0,0" + (" with --eval-iters 0 (no validation)" if wanted[1] else ""))
            asked = (f"one epoch of {name} samples is" if num_samples[i] is None
                     else f"{num_samples[i]} {name} samples are")
            raise ValueError(
                f"{prefix} has {documents} documents: split={split!r} leaves the {name} split with none, "
                f"but {asked} requested; pass {' or '.join(fixes) if fixes else 'more documents'}"
            )
    return dropped


def build_train_valid_datasets(
    data: str | Sequence[str],
    tokenizer,
    seq_length: int,
    num_samples: Sequence[int | None],
    split: str = "969,30,1",
    seed: int = 1234,
    path_to_cache: str | Path | None = None,
    eod_mask_loss: bool = False,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    create_attention_mask: bool = False,
    loss_mask_data: str | Sequence[str] | None = None,
) -> GPTDatasets:
    """Build the train, valid and test GPTDatasets (None for a split with zero weight, or
    one that gets no documents and no samples).

    Args:
        data: data prefix(es) written by preprocessing, or a weighted blend
            ("30 prefixA 70 prefixB" or ["30", "prefixA", "70", "prefixB"]).
        tokenizer: provides `eod`, `pad`, `vocab_size`, `unique_identifiers`
            (megaseg.data.tokenizer.SentencePieceTokenizer).
        seq_length: tokens per sample fed to the model; samples hold seq_length + 1.
        num_samples: (train, valid, test) sample counts; None means one epoch of that
            split (only without blend weights).
        split: relative train/valid/test sizes carved out of every dataset.
        seed: shuffling seed.
        path_to_cache: where megatron-core saves the index .npy files (None: in memory).
        loss_mask_data: per prefix of ``data``, in the same order, an indexed dataset of
            the same documents (same lengths) holding 1 where a token is trained on and
            0 elsewhere (e.g. `tools/make_recall_data.py --loss-mask-output answers`): the
            loss of predicting a token counts only where its mask is 1.
    """
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    if len(num_samples) != 3:
        raise ValueError(f"num_samples needs (train, valid, test), got {list(num_samples)}")
    prefixes, weights = parse_blend(data)
    _check_prefixes(prefixes)
    ensure_helpers()
    empty = _check_splits(prefixes, split, num_samples)
    mask_prefixes = parse_blend(loss_mask_data)[0] if loss_mask_data is not None else []
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:  # megatron-core builds on rank 0 first
        for stale in drop_stale_index_caches([*prefixes, *mask_prefixes], path_to_cache):
            print(f"dataset index cache {stale.name[: -len('-description.txt')]} in {stale.parent} is older than "
                  "its data: rebuilt", flush=True)

    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    config = _gpt_config(
        prefixes, weights, tokenizer, seq_length, split, seed, path_to_cache, empty,
        eod_mask_loss=eod_mask_loss,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        create_attention_mask=create_attention_mask,
    )
    builder = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config)
    built = builder.build()
    if loss_mask_data is None:
        return GPTDatasets(*built)
    masks = _mask_datasets(prefixes, weights, loss_mask_data, config, empty, num_samples)
    return GPTDatasets(*(None if d is None else MaskedDataset(d, m) for d, m in zip(built, masks)))


def _gpt_config(prefixes, weights, tokenizer, seq_length, split, seed, path_to_cache, empty, *, eod_mask_loss,
                reset_position_ids, reset_attention_mask, create_attention_mask):
    """megatron-core's GPTDatasetConfig of a build, with no split rows for the ``empty`` splits
    (no documents and no samples asked for: build no dataset rather than loop)."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=None if path_to_cache is None else str(path_to_cache),
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
    )
    for i in empty:
        config.split_matrix[i] = None
    return config


def _mask_datasets(prefixes, weights, loss_mask_data, config, empty, num_samples):
    """The loss-mask datasets, sampled exactly like the token datasets: same document
    lengths, same configuration (seed, split, sequence length), so the same sample and
    shuffle indices."""
    import dataclasses

    import numpy as np
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    mask_prefixes, _ = parse_blend(loss_mask_data)
    if len(mask_prefixes) != len(prefixes):
        raise ValueError(f"loss_mask_data has {len(mask_prefixes)} prefixes for {len(prefixes)} data prefixes; give "
                         "one per data prefix, in the same order")
    _check_prefixes(mask_prefixes)
    for data_prefix, mask_prefix in zip(prefixes, mask_prefixes):
        data_index, mask_index = IndexedDataset(data_prefix), IndexedDataset(mask_prefix)  # alive: arrays are mmaps
        a, b = np.array(data_index.sequence_lengths), np.array(mask_index.sequence_lengths)
        del data_index, mask_index
        if len(a) != len(b) or not np.array_equal(a, b):
            raise ValueError(f"the loss mask {mask_prefix} does not have the documents of {data_prefix} "
                             f"({len(b)} vs {len(a)} documents, or other lengths): write both from the same run")
    mask_config = dataclasses.replace(config, blend=(mask_prefixes, weights), reset_position_ids=False,
                                      reset_attention_mask=False, eod_mask_loss=False)
    for i in empty:
        mask_config.split_matrix[i] = None
    return BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, mask_config).build()


class MaskedDataset:
    """A GPT dataset whose loss mask is also 0 where a parallel mask dataset's label is not 1."""

    def __init__(self, data, mask):
        if len(data) != len(mask):
            raise ValueError(f"the loss mask dataset has {len(mask)} samples for {len(data)}")
        self.data, self.mask = data, mask

    def __len__(self) -> int:
        return len(self.data)

    def __getattr__(self, name):  # the token dataset's attributes (config, indexed_dataset, ...)
        if name in ("data", "mask"):
            raise AttributeError(name)
        return getattr(self.data, name)

    def __getitem__(self, i):
        import torch

        sample = dict(self.data[i])
        keep = torch.as_tensor(self.mask[i]["labels"]) == 1
        base = torch.as_tensor(sample.get("loss_mask", torch.ones_like(keep, dtype=torch.float)))
        sample["loss_mask"] = base * keep
        return sample
