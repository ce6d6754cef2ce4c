"""A DistributedSampler that can start in the middle of an epoch.

Exact resume needs the data order to continue where it stopped: the permutation depends only on
(seed, epoch) and the position is a number of batches already consumed, so a resumed run skips
indices without loading them.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Dataset, DistributedSampler


def batches_per_replica(samples: int, replicas: int, batch_size: int) -> int:
    """Whole batches each of `replicas` processes trains on per epoch: each takes an equal
    share of the `samples` (the remainder left out, as `drop_last` does) in whole batches. The
    one rule for the trainer and for the check at submit."""
    return (samples // replicas) // batch_size


class ResumableSampler(DistributedSampler):
    def __init__(
        self,
        dataset: Dataset,
        *,
        num_replicas: int,
        rank: int,
        seed: int,
        batch_size: int,
        shuffle: bool = True,
    ) -> None:
        super().__init__(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=True,
        )
        self.batch_size = batch_size
        self.skip_batches = 0

    def set_position(self, epoch: int, batches_done: int) -> None:
        """Start `epoch` after its first `batches_done` batches (of this rank)."""
        self.set_epoch(epoch)
        self.skip_batches = batches_done

    def batches_per_epoch(self) -> int:
        return batches_per_replica(len(self.dataset), self.num_replicas, self.batch_size)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        usable = self.batches_per_epoch() * self.batch_size
        start = self.skip_batches * self.batch_size
        self.skip_batches = 0
        return iter(indices[start:usable])

    def __len__(self) -> int:
        return self.batches_per_epoch() * self.batch_size - self.skip_batches * self.batch_size
