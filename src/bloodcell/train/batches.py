"""Batches for Lightning's loaders: which indices make each batch of an epoch (EpochBatches) and the images and labels
of those indices, read from the preprocessing cache or an in-memory array (ArrayBatches).

A batch is drawn from a (seed, epoch) permutation, so a resumed run sees the batches the uninterrupted one would have.
"""

from __future__ import annotations

import mmap

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from bloodcell.train.module import epoch_seed


class EpochBatches(Sampler):
    """Batches of indices: a (seed, epoch) permutation when shuffling, sharded across DDP ranks.

    A last batch of one image joins the batch before it: BatchNorm cannot train on one image whose features are
    1x1 (small inputs through deep networks), and the images of every epoch are all still seen.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> np.ndarray:
        if self.shuffle:
            order = np.random.default_rng(epoch_seed(self.seed, self.epoch, 7)).permutation(self.n)
        else:
            order = np.arange(self.n)
        if self.world_size > 1:  # equal shares for every rank (DDP needs the same number of steps)
            per_rank = -(-self.n // self.world_size)
            order = np.resize(order, per_rank * self.world_size)[self.rank :: self.world_size]
        return order

    def __iter__(self):
        order = self._indices()
        starts = list(range(0, len(order), self.batch_size))
        if len(starts) > 1 and len(order) - starts[-1] == 1:
            starts.pop()  # a lone last image joins the batch before it
        for start, end in zip(starts, starts[1:] + [len(order)]):
            yield order[start:end].tolist()

    def __len__(self) -> int:
        per_rank = -(-self.n // self.world_size)
        batches = -(-per_rank // self.batch_size)
        return batches - 1 if batches > 1 and per_rank % self.batch_size == 1 else batches


class ArrayBatches(Dataset):
    """Item i of the sampler is a list of positions; returns (uint8 images (B,H,W,3) or their indices, labels)."""

    def __init__(self, images: np.ndarray | None, labels: np.ndarray, index: np.ndarray):
        self.images, self.labels, self.index = images, labels, np.asarray(index)

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:
        """Sent to a spawned loader worker: the preprocessing cache's memmap as its file (reopened there), not its
        bytes."""
        state = dict(self.__dict__)
        a = self.images
        if isinstance(a, np.memmap) and isinstance(a.base, mmap.mmap) and a.filename:
            fortran = bool(a.flags.f_contiguous and not a.flags.c_contiguous)
            state["images"] = ("memmap", a.filename, a.offset, a.shape, a.dtype.str, fortran)
        return state

    def __setstate__(self, state: dict) -> None:
        a = state["images"]
        if isinstance(a, tuple):
            _, filename, offset, shape, dtype, fortran = a
            state["images"] = np.memmap(
                filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape, order="F" if fortran else "C"
            )
        self.__dict__.update(state)

    def __getitem__(self, positions):
        idx = self.index[np.asarray(positions)]
        y = torch.from_numpy(self.labels[idx].astype(np.int64))
        if self.images is None:  # images live on the device; send indices only
            return torch.from_numpy(idx.astype(np.int64)), y
        order = np.argsort(idx, kind="stable")  # sorted reads are faster from a memmap
        x = np.empty((len(idx),) + self.images.shape[1:], dtype=np.uint8)
        x[order] = self.images[idx[order]]
        return torch.from_numpy(x), y
