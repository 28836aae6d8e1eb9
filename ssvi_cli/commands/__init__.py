"""One module per ``ssvi`` subcommand; each exposes ``register(app)``."""
