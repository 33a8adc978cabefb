"""Input pipelines and evaluation on seqio: vocabularies, span corruption and
task formatting, registered tasks, metrics, and the offline pydoc corpus.

Modules are imported explicitly (`from miniend_jax.data import tasks`), since
importing `tasks` registers the TFDS tasks.

The pipelines are TensorFlow (tf.data through seqio) and run on the host CPU:
TensorFlow is kept off the GPUs here, before any of it runs, so it never claims
accelerator memory that JAX needs (as t5x does).
"""

import tensorflow as tf

try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow already ran in this process: too late to hide them.
  pass
