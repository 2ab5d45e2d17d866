"""What every test gets back afterwards: benchmark and CLI code run in-process set torch's thread count and quiet the
package's and diffusers' loggers for their tables; a later test that reads warnings must see them."""

import logging

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_global_settings():
    from diffusers.utils import logging as diffusers_logging

    threads = torch.get_num_threads()
    package_logger = logging.getLogger("diffusers_mask2dit")
    level, verbosity = package_logger.level, diffusers_logging.get_verbosity()
    yield
    torch.set_num_threads(threads)
    package_logger.setLevel(level)
    diffusers_logging.set_verbosity(verbosity)
