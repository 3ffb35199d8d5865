"""Command-line tools: benchmarks, FLOP counts, pictures, export."""
