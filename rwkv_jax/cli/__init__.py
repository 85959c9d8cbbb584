"""The command-line programs, one module per command (`python -m rwkv_jax.cli.<name>`, console scripts
`rwkv-<name>`), and `runner`, their shared flag parsing, one-line errors and exit codes. Nothing in the
library imports this package."""
