"""The IB-IUMAD network (Mamba decoder with ES2D scan, IB fusion, product heads, losses), pure PyTorch.

The continual logic lives in ``components/methods/ib_iumad.py``; this package holds only ``nn.Module``s
and tensor functions.
"""
