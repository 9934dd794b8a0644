"""Session-wide test setup: one torch thread (2-core machines), real Ray fixtures."""

import torch

torch.set_num_threads(1)

pytest_plugins = ["tests.ray_cluster"]
