"""moe op family: reference, Triton and Pallas TPU implementations."""
