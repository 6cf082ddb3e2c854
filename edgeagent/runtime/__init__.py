"""Inference runtimes behind one backend interface, and the model manager."""
