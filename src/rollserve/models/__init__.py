"""Model definitions, checkpoint loading and the offline tiny-model factory."""
