"""Benchmarks: scripts that measure the toolkit against its references and print ratios with the CPU named."""
