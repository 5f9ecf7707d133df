"""The "torch" backend: autograd through the real tail (the oracle path), and every compiled op's
plain PyTorch twin, which the tests hold the kernels equal to."""
