"""The only package that imports deepspeed: engine config, initialisation, checkpoints."""
