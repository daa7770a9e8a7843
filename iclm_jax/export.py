"""``python -m iclm_jax.export --workdir RUN --out DIR [--force]`` (also ``iclm-export``): see iclm_jax.hf.export."""
import sys

from iclm_jax.hf.export import main

if __name__ == "__main__":
    sys.exit(main())
