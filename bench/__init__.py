"""Benchmarks of D2O training, sampling and FID features (BENCHMARKS.md). `python -m bench` runs the default
set; `python -m bench.train_step|sampling|fid_pipeline --help` run one measurement."""
