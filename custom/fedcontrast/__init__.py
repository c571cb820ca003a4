"""fedcontrast: federated contrastive pre-training for 3D cardiac MRI segmentation.

Learning code (``fedcontrast.methods``, ``fedcontrast.nets``, ``fedcontrast.data``) is plain
PyTorch/MONAI; ``fedcontrast.flare`` moves tensors between sites with NVIDIA FLARE.
"""

__version__ = "0.1.0"
