"""Kernel sources (.cu/.cuh), shipped as package data and compiled at first use."""
