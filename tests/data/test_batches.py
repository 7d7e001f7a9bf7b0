"""Shape buckets: a small fixed set of padded lengths (few compiled programs), a padded row at
most 1.5x its length beyond two buckets, every length served by the smallest bucket that holds it."""
import pytest

from reft_jax.data.batches import bucket_length, bucket_sizes


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
