"""One module per DVC stage; each exposes `run(cfg)` or `run(cfg, split)`."""
