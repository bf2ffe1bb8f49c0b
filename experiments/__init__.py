"""Experiment configs (configs/*.yaml), sweep specs (sweeps/*.yaml) and the sweep runner."""
