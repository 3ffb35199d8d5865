"""Datasets of the three tasks (folder.py, segmentation.py, coco.py), the embedded demo data (mnist.py, scenes.py),
reading image files alike in all of them (files.py) and checking a dataset before training (checks.py)."""
