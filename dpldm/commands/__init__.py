"""The drivers behind ``dpldm COMMAND``, each a module with ``main(argv)``; the library they call lives below
(``modules/``, ``privacy/``, ``datamodules/``, ``metrics/``, ``callbacks/``, ``export/``, ``audit/``)."""

import os

# configs/ of the checkout (the package is installed in editable mode)
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
