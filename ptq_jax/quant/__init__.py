"""Quantization core: quantizers, BN folding, the quantized forward pass, export."""
