"""Whole models: quantize_model (chunked and sharded engines), rules and reports."""
