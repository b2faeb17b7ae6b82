"""Benchmarks of dlvm_jax (run each module as a script; results land in benchmarks/results/)."""
