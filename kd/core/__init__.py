"""The training core: what one run needs, from the process group to the Trainer.

See kd/README.md for the package map.
"""
