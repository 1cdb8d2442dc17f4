"""Training with PyTorch Lightning: the module, the data module, run folders, test reports and export.

Built on the torch-only library (``vitlora``); nothing there imports this package.
"""

from vitlora.training.data import ImageDataModule
from vitlora.training.export import export_adapter
from vitlora.training.module import ImageClassifier

__all__ = ["ImageClassifier", "ImageDataModule", "export_adapter"]
