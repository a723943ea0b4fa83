"""Measuring what the policy needs on the real devices and text: cost tables, mean expert outputs."""
