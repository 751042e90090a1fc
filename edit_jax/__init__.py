"""edit-jax: communication-efficient distributed pretraining (EDiT and its family) in JAX."""

__version__ = "0.1.0"
