"""Input pipelines and evaluation on seqio: vocabularies, span corruption and
task formatting, registered tasks, metrics, and the offline pydoc corpus.

Modules are imported explicitly (`from miniend_jax.data import tasks`), since
importing `tasks` registers the TFDS tasks and pulls in TensorFlow.
"""
