"""python -m miniend_jax.cli [flags]: the same as `miniend` (and `python -m miniend_jax`)."""

import sys

from miniend_jax.cli import main

sys.exit(main())
