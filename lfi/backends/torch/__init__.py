"""The "torch" backend: PyTorch reference implementations, any device, row-chunked."""
