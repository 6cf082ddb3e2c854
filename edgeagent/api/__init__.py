"""Local HTTP endpoint: the Open Inference Protocol (KServe v2) with Triton extensions."""
