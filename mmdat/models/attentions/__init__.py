from .common import LayerNorm2d
from .deformable import DeformableAttention
from .neighborhood import NeighborhoodAttention
from .window import WindowAttention

__all__ = ['LayerNorm2d', 'DeformableAttention', 'NeighborhoodAttention',
           'WindowAttention']
