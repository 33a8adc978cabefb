import sys

from miniend_jax.cli import main

sys.exit(main())
