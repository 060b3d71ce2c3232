"""Shared helpers for training and evaluating LCR-BNN models."""
