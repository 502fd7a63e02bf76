"""Samplers and loaders that make training resumable mid-epoch and split data across processes.

Lightning restores a data loader mid-epoch only if the loader has ``state_dict`` /
``load_state_dict``; torch's ``DataLoader`` and ``DistributedSampler`` do not, and
``DistributedSampler`` pads evaluation sets with repeated images, which skews a metric
gathered across processes. torchdata's ``StatefulDataLoader`` was considered; it does not
seed augmentations per image, which an exact resume also needs. So:

- :class:`EpochSampler` shuffles with a generator seeded by (seed, epoch), gives each
  process its share, and yields ``(index, seed)`` pairs so that every image's augmentation
  is seeded by itself (:class:`SeededDataset`), whatever the worker or restart.
- :class:`ShardSampler` splits an evaluation set across processes without repeating images.
- :class:`ResumableLoader` counts the batches it has handed out and skips them after a restart.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from .images import Skipped

__all__ = [
    "EpochSampler", "ShardSampler", "SeededDataset", "ResumableLoader", "collate_skipping", "dist_info", "process_share",
    "ShardedDataModule",
]


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the current process group, (0, 1) when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def process_share(trainer: Any | None) -> tuple[int, int]:
    """(rank, world size) a data module splits its data by: the trainer's, else the process group's.

    monatune's data modules give each process its share themselves, so a Trainer that would also
    wrap their samplers in ``DistributedSampler`` is refused.
    """
    if trainer is not None:
        if trainer.world_size > 1 and trainer._accelerator_connector.use_distributed_sampler:
            raise ValueError(
                "monatune's data modules split the data across processes themselves; "
                "create the Trainer with use_distributed_sampler=False"
            )
        return trainer.global_rank, trainer.world_size
    return dist_info()


class EpochSampler(Sampler):
    """Shuffled ``(index, seed)`` pairs for one process; the order depends only on (seed, epoch).

    Each process takes every ``world_size``-th item of the epoch's permutation, padded with the
    permutation's first items so all processes run the same number of steps.
    """

    def __init__(self, size: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.seed, self.shuffle, self.rank, self.world_size = size, seed, shuffle, rank, world_size
        self.epoch = 0
        self.skip = 0  # items of this epoch already consumed before a restart

    def set_epoch(self, epoch: int) -> None:  # called by Lightning at the start of every epoch
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.size / self.world_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=g) if self.shuffle else torch.arange(self.size)
        seeds = torch.randint(0, 2**62, (self.size,), generator=g)
        total = len(self) * self.world_size
        order = torch.cat([order, order[: total - self.size]]) if total > self.size else order
        mine = order[self.rank :: self.world_size].tolist()
        skip, self.skip = self.skip, 0
        for i in mine[skip:]:
            yield i, int(seeds[i])


class ShardSampler(Sampler):
    """Indices ``rank, rank + world_size, ...``: every image evaluated exactly once across processes."""

    def __init__(self, size: int, *, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.rank, self.world_size = size, rank, world_size

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))


class SeededDataset(Dataset):
    """Wraps a data set so that ``ds[(index, seed)]`` runs its random transforms under ``seed``.

    The global RNG is forked, so loading an image neither depends on nor disturbs the RNG
    the model's dropout and drop-path use. Plain integer indices pass straight through.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if isinstance(key, tuple):
            index, seed = key
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self.dataset[index]
        return self.dataset[key]


def collate_skipping(items: Sequence[Any]) -> dict[str, Any]:
    """Collate ``{"image", "target", ...}`` dicts, dropping :class:`~monatune.data.images.Skipped` markers.

    Adds ``"skipped"``: the files of the items dropped from this batch (unreadable images under
    ``on_bad_image="skip"``), which :class:`~monatune.engine.RunSummary` reports.
    """
    kept = [item for item in items if not isinstance(item, Skipped)]
    batch = default_collate(kept) if kept else {}
    batch["skipped"] = [item.path for item in items if isinstance(item, Skipped)]
    return batch


class ResumableLoader(DataLoader):
    """A ``DataLoader`` that Lightning can save and restore in the middle of an epoch.

    Its sampler must be an :class:`EpochSampler`. ``state_dict`` records the epoch and the
    batches handed out so far; after ``load_state_dict`` the next pass skips exactly those.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, EpochSampler):
            raise TypeError("ResumableLoader needs an EpochSampler")
        self._served = 0

    def __iter__(self) -> Iterator[Any]:
        self._served = self.sampler.skip // self.batch_size if self.batch_size else 0
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.epoch = state["epoch"]
        self.sampler.skip = state["batches"] * (self.batch_size or 1)


class ShardedDataModule(L.LightningDataModule):
    """The loaders of monatune's data modules: resumable shuffled training, evaluation split across processes.

    A subclass sets ``train_set``, ``val_set``, a ``test_set`` (a property may read it lazily),
    ``batch_size``, ``num_workers`` and ``seed``, and may override ``collate`` (how items batch),
    ``items`` (what wraps a data set for the loaders) and ``predict_set`` (default: the test set).
    With ``drop_last_train`` every training batch holds ``batch_size`` items: an epoch's incomplete
    last batch is left out (a different one each epoch, as the order is reshuffled).
    """

    collate = staticmethod(collate_skipping)
    drop_last_train = False

    def items(self, dataset: Dataset) -> Dataset:
        return dataset

    def train_items(self) -> Dataset:
        return self.items(self.train_set)

    def predict_set(self) -> Dataset:
        return self.items(self.test_set)

    def _rank(self) -> tuple[int, int]:
        return process_share(self.trainer)

    def _generator(self) -> torch.Generator:
        # the loader draws its worker seed from this, not from the global RNG the model uses
        return torch.Generator().manual_seed(self.seed)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        dataset = self.train_items()
        sampler = EpochSampler(len(dataset), seed=self.seed, shuffle=True, rank=rank, world_size=world)
        if self.drop_last_train and len(sampler) < self.batch_size:
            raise ValueError(
                f"the training split has {len(dataset)} images, {len(sampler)} per process ({world} process(es)), "
                f"fewer than one full batch (data.batch_size={self.batch_size}), and {type(self).__name__} trains "
                "on full batches only; lower data.batch_size or add images"
            )
        # a resume skips whole batches (ResumableLoader), so dropping the last incomplete one keeps it exact
        return ResumableLoader(
            SeededDataset(dataset), batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
            collate_fn=self.collate, generator=self._generator(), persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(), drop_last=self.drop_last_train,
        )  # fmt: skip

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        rank, world = self._rank()
        return DataLoader(
            dataset, batch_size=self.batch_size, sampler=ShardSampler(len(dataset), rank=rank, world_size=world),
            num_workers=self.num_workers, collate_fn=self.collate, generator=self._generator(),
            pin_memory=torch.cuda.is_available(),
        )  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.items(self.val_set))

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.items(self.test_set))

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.predict_set())
