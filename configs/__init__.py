"""Experiment configs: each module has get_config(arg) for --config=configs/<name>.py[:arg]."""
