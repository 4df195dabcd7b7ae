"""Native CPU kernels, compiled at run time for the model at hand (see build.py)."""
