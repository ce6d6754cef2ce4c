"""The batch count the submit check predicts is the one the trainer's sampler gives."""

from __future__ import annotations

import pytest

from hmkd_core.engine.sampler import ResumableSampler, batches_per_replica


@pytest.mark.parametrize("samples", [1, 2, 3, 5, 8, 17])
@pytest.mark.parametrize("replicas", [1, 2, 3, 8])
@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_batches_per_replica_is_what_every_rank_draws(
    samples: int, replicas: int, batch_size: int
) -> None:
    dataset = list(range(samples))
    want = batches_per_replica(samples, replicas, batch_size)
    for rank in range(replicas):
        sampler = ResumableSampler(
            dataset, num_replicas=replicas, rank=rank, seed=0, batch_size=batch_size
        )
        assert sampler.batches_per_epoch() == want
        assert len(list(sampler)) == want * batch_size  # what the rank really iterates


def test_the_remainder_is_left_out_not_padded() -> None:
    # 3 images over 2 processes: each trains on 1, so a batch of 2 fills on neither
    assert batches_per_replica(3, 2, 2) == 0
    assert batches_per_replica(4, 2, 2) == 1
