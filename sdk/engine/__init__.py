"""The training engine: method interface, registry, config, trainer, run directory."""
