"""The header of a `.npy` array, read without its data: np.load allocates whatever a header declares (a 1 KB
file can declare terabytes), so readers compare the declared size with what the file holds first
(docs/threat-model.md)."""
import math

import numpy as np

HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def declared_array(f):
    """(shape, dtype, bytes) that the `.npy` stream `f` (at its start) declares; ValueError for anything but a
    version 1 or 2 header. Leaves `f` after the header."""
    read_header = HEADER_READERS.get(np.lib.format.read_magic(f))
    if read_header is None:
        raise ValueError('not a version 1 or 2 .npy array')
    shape, _, dtype = read_header(f)
    return shape, dtype, math.prod(shape) * dtype.itemsize
