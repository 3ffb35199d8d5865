"""Datasets: the standard folder layout for classification, and the embedded MNIST-5k default."""
