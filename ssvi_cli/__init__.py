"""ssvi: sparse Bayesian neural networks with Sparse Subspace Variational Inference."""

__version__ = "0.1.0"
