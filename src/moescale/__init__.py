"""moescale: scaling studies of sparse feed-forward layers in JAX/Flax NNX.

`import moescale` is light: it never imports TensorFlow or seqio (only `moescale.data` does).
"""

__version__ = '0.1.0'
