"""Packaged Hydra configs (`rollserve launch` reads `launch.yaml`)."""
