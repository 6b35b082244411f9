"""Calibration: clipping ranges from histograms (MinMax, Entropy, MSE, Percentile, MeanStd)."""
