"""The kernels: linear layers, attention and fused ops on the project's C sources (csrc/) or oneDNN."""
