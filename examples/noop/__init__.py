"""A benchmark task: a model of any size whose "training" is a cheap deterministic no-op step."""
