"""Entry points of the `miles-fsdp` console script; each module has a Config and main(cfg)."""
