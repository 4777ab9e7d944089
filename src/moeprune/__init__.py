"""moeprune: make sparse Mixture-of-Experts language models smaller after training."""

__version__ = "0.1.0"
