"""attention op family: reference, Triton and Pallas TPU implementations."""
