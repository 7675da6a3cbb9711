"""One command for a GPU window: `python -m bench.gpu` (or `bench/gpu.sh`), see __main__."""
