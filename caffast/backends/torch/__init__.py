"""The "torch" backend: plain PyTorch on any device, the oracle path: the shared loop on autograd
through the real tail or on a fused head's closed form (caffast.core.problems), each evaluation of a
generic tail on a CUDA GPU replayed from a captured graph (graphs)."""
