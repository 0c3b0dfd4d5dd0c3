"""tfgate's benchmarks: they drive the real endpoint and print ratios against baselines measured in the same run."""
