"""Shape buckets: a small fixed set of padded lengths (few compiled programs), a padded row at
most 1.5x its length beyond two buckets, every length served by the smallest bucket that holds it."""
import numpy as np
import pytest

from reft_jax.data.batches import bucket_length, bucket_sizes, epoch_batches, steps_per_epoch


def test_bucket_sizes_are_few_and_fixed():
    assert bucket_sizes(64, 1024) == [64, 128, 192, 256, 384, 512, 768, 1024]
    assert bucket_sizes(32, 300) == [32, 64, 96, 128, 192, 256, 300]
    assert bucket_sizes(64, 700) == [64, 128, 192, 256, 384, 512, 700]
    assert bucket_sizes(64, 64) == [64] and bucket_sizes(64, 50) == [50]


@pytest.mark.parametrize("bucket,cap", [(16, 160), (32, 300), (64, 1024), (64, 700), (7, 1000)])
def test_every_length_gets_the_smallest_bucket_that_holds_it(bucket, cap):
    sizes = bucket_sizes(bucket, cap)
    for n in range(1, cap + 1):
        got = bucket_length(n, bucket, cap)
        assert got in sizes and got >= n
        assert all(s < n for s in sizes if s < got)  # no smaller bucket would do
        if n > 2 * bucket:  # beyond two buckets, a padded row is at most 1.5x its length
            assert got <= n * 1.5 + 1e-9 or got == cap
    assert bucket_length(cap + 5, bucket, cap) == cap  # longer rows are cut to the cap


def test_a_last_partial_batch_is_kept_short_dropped_or_filled_from_the_epoch_start():
    """`fill` is what accelerate's DataLoader does for ReFT's RL runs (even_batches): every
    question is in the epoch and every batch has the same size; the order is (seed, epoch)'s."""
    short = epoch_batches(40, 16, seed=3, epoch=1)
    assert [len(b) for b in short] == [16, 16, 8] and steps_per_epoch(40, 16) == 3
    assert [len(b) for b in epoch_batches(40, 16, seed=3, epoch=1, last="drop")] == [16, 16]
    assert steps_per_epoch(40, 16, "drop") == 2
    fill = epoch_batches(40, 16, seed=3, epoch=1, last="fill")
    assert [len(b) for b in fill] == [16, 16, 16] and steps_per_epoch(40, 16, "fill") == 3
    order = np.concatenate(short)
    np.testing.assert_array_equal(fill[2], np.concatenate([order[32:], order[:8]]))
    assert set(np.concatenate(fill)) == set(range(40))
    np.testing.assert_array_equal(np.concatenate(epoch_batches(40, 16, 3, 1, last="fill")), np.concatenate(fill))
    assert not np.array_equal(np.concatenate(epoch_batches(40, 16, 3, 2, last="fill")), np.concatenate(fill))
    # fewer questions than a batch: cycled, as accelerate does
    np.testing.assert_array_equal(epoch_batches(3, 8, 0, 0, shuffle=False, last="fill")[0], [0, 1, 2, 0, 1, 2, 0, 1])
    # a full last batch is untouched
    assert [len(b) for b in epoch_batches(32, 16, 0, 0, last="fill")] == [16, 16]
