"""Batches for training and evaluation: blended, sharded over data-parallel ranks, resumable.

Global sample numbers are laid out step by step: step k uses samples
[k·B·W, (k+1)·B·W) (B = micro-batch, W = world size) and rank r takes its contiguous slice
[(k·W + r)·B, (k·W + r + 1)·B), as savanna's DistributedBatchSampler does. Each sample number maps
to a dataset (blending) and a sample in it (the dataset's own endless, seeded order), so the stream
is a pure function of (seed, rank, world_size, step): resuming at `start_step` starts there directly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np

from evo2_hydra.config import DataConfig, Packing, ToUpper
from evo2_hydra.data.blending import BlendSchedule
from evo2_hydra.data.datasets import ContiguousDataset, PaddedDataset
from evo2_hydra.data.indexed import MMapIndexedDataset
from evo2_hydra.data.loss import loss_mask_and_weights, upper_case
from evo2_hydra.data.prepare import DatasetSpec, PreparedData
from evo2_hydra.errors import UserError

log = logging.getLogger("evo2_hydra.data")


class SampleSource:
    """The datasets of one split with their blend: global sample number -> window of tokens."""

    def __init__(
        self,
        data: DataConfig,
        specs: list[DatasetSpec],
        context: int,
        seed: int,
        split: str,
        index_dir: str | None = None,
    ):
        self.datasets = []
        for spec in specs:
            indexed = MMapIndexedDataset(spec.prefix)
            lo, hi = spec.documents if spec.documents is not None else (0, len(indexed))
            documents = np.arange(lo, hi)
            if data.packing == Packing.padded:
                ds = PaddedDataset(indexed, documents, context, seed, truncate=data.truncate)
            else:
                name = f"{split}{lo}-{hi}"
                ds = ContiguousDataset(indexed, documents, context, seed, name, index_dir)
            self.datasets.append(ds)
        # No weight given: in proportion to the data, as if the datasets were concatenated.
        weights = [
            ds.samples_per_epoch if spec.weight is None else spec.weight
            for spec, ds in zip(specs, self.datasets)
        ]
        self.blend = BlendSchedule(weights) if specs else None
        self.samples_per_epoch = sum(ds.samples_per_epoch for ds in self.datasets)

    def windows(self, samples: np.ndarray) -> np.ndarray:
        which, local = self.blend.lookup(samples)
        return np.stack([self.datasets[d].sample(int(i)) for d, i in zip(which, local)])


def make_batch(windows: np.ndarray, data: DataConfig):
    """Windows [B, context+1] -> {input_ids, labels, loss_weight, loss_mask} torch tensors."""
    import torch

    inputs, labels = windows[:, :-1], windows[:, 1:]
    mask, weight = loss_mask_and_weights(
        inputs,
        labels,
        to_upper=data.to_upper,
        lowercase_weight=data.lowercase_weight,
        mask_control_tags=data.mask_control_tags,
        eod_mask_loss=data.eod_mask_loss,
        pad_mask_loss=data.pad_mask_loss,
        mask_pad_labels=data.packing == Packing.padded,
    )
    if data.to_upper != ToUpper.none:
        inputs, labels = upper_case(inputs), upper_case(labels)
    return {
        "input_ids": torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.int64)),
        "labels": torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
        "loss_weight": torch.from_numpy(weight),
        "loss_mask": torch.from_numpy(mask),
    }


def _check(micro_batch_size: int, rank: int, world_size: int, start_step: int) -> None:
    if micro_batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size or start_step < 0:
        raise ValueError(
            f"bad stream layout: micro_batch_size={micro_batch_size}, rank={rank}, "
            f"world_size={world_size}, start_step={start_step}"
        )


def rank_samples(step: int, micro_batch_size: int, rank: int, world_size: int) -> np.ndarray:
    """Global sample numbers of `rank`'s micro-batch at `step`."""
    first = (step * world_size + rank) * micro_batch_size
    return np.arange(first, first + micro_batch_size, dtype=np.int64)


def build_train_stream(
    data: DataConfig,
    prepared: PreparedData,
    context: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    start_step: int = 0,
) -> Iterator[dict]:
    """Endless training batches for `rank`; `start_step` counts micro-batches already drawn.

    (With gradient accumulation, resume at optimizer_step × grad_accum_steps.)
    """
    _check(micro_batch_size, rank, world_size, start_step)
    if not prepared.train:
        raise UserError("data.input: no training data")
    source = SampleSource(data, prepared.train, context, seed, "train", prepared.index_dir)
    step = start_step
    while True:
        samples = rank_samples(step, micro_batch_size, rank, world_size)
        yield make_batch(source.windows(samples), data)
        step += 1


def build_eval_batches(
    data: DataConfig,
    prepared: PreparedData,
    context: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    num_batches: int | None = None,
    split: str = "valid",
) -> list[dict]:
    """A fixed list of `split` batches for `rank` (the same every call).

    `num_batches` None = one pass over the split (at least one batch; samples wrap around).
    An empty split, or one with too few tokens for a sample, gives [] (with a warning).
    """
    _check(micro_batch_size, rank, world_size, 0)
    specs = getattr(prepared, split)
    usable = []
    for spec in specs:  # a split too small for one sample is skipped, not fatal mid-run
        try:
            SampleSource(data, [spec], context, seed, split, prepared.index_dir)
            usable.append(spec)
        except UserError as err:
            log.warning("data: no %s batches from %s: %s", split, spec.prefix, err)
    if not usable:
        return []
    source = SampleSource(data, usable, context, seed, split, prepared.index_dir)
    if num_batches is None:
        num_batches = max(1, source.samples_per_epoch // (micro_batch_size * world_size))
    return [
        make_batch(source.windows(rank_samples(step, micro_batch_size, rank, world_size)), data)
        for step in range(num_batches)
    ]
