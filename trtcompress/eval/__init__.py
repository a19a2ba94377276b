"""Evaluation: data, metrics, the protocol harness and its reports."""
