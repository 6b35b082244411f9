"""One tensor: QuantizedTensor, quantize/dequantize, the checks and sums every engine shares, dot."""
