"""python -m miniend_jax.quickstart [flags]: the same as `miniend quickstart`."""

import sys

from miniend_jax.quickstart.command import main

sys.exit(main())
