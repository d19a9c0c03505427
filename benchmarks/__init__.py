"""Side-by-side benchmarks (lorakit vs PEFT vs full fine-tuning). Run with `make bench`."""
